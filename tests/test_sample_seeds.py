"""Per-sample seeds: a sample depends only on the run's seed and its index, not on eval.batch_size, the round it
falls in or the rank that draws it (`sampling.SampleGenerators`, the jobs' `sample_generators`), while a plain
torch.Generator draws as before."""
from __future__ import annotations

import pytest
import torch

from sde_diffusion import distributed, sampling
from sde_diffusion.generators import SampleGenerators, randn
from sde_diffusion.sdes import VESDE, VPSDE
from sde_diffusion.toy import default_mixture

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = ATOL = 1e-5  # float round-off of the network on batches of other sizes
METHODS = {"ancestral": "time", "ddim": "logsnr", "pc": "time"}  # stochastic, deterministic, stochastic


@pytest.fixture(scope="module")
def toy_run():
    """(config, sde, dataset, model): configs/toy_gmm.py with a tiny MLP whose weights are all random."""
    from configs import toy_gmm
    from sde_diffusion.jobs import builder
    config = toy_gmm.get_config()
    config.model.nf, config.model.num_res_blocks, config.device = 16, 1, "cpu"
    config.sampling.steps, config.sampling.corrector = 4, "ald"  # (langevin: batch-mean steps)
    torch.manual_seed(0)
    sde, dataset, model = builder.build(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return config, sde, dataset, model.eval()


def configured(config, method: str, batch_size: int):
    config = config.copy_and_resolve_references()
    config.sampling.method, config.sampling.grid, config.eval.batch_size = method, METHODS[method], batch_size
    return config


@pytest.mark.parametrize("method", METHODS)
def test_draw_samples_do_not_depend_on_the_batch_size(toy_run, method):
    from sde_diffusion.jobs.generation import draw_samples
    config, sde, dataset, model = toy_run
    drawn = [draw_samples(configured(config, method, b), sde, model, dataset, 10, "cpu", seed=7)[0]
             for b in (4, 3, 8)]
    for other in drawn[1:]:
        torch.testing.assert_close(other, drawn[0], rtol=RTOL, atol=ATOL)
    assert drawn[0].std(0).min() > 0.1  # ten different samples, not one repeated
    again = draw_samples(configured(config, method, 4), sde, model, dataset, 10, "cpu", seed=8)[0]
    assert (again - drawn[0]).abs().max() > 0.1  # another seed, other samples


def test_scored_rounds_do_not_depend_on_round_size_or_rank(toy_run, tmp_path, monkeypatch):
    """generate_and_score in rounds of 4 in one process = rounds of 3 shared by two ranks (rank 1 makes rounds 1
    and 3, rank 0 rounds 0 and 2 and collects them; barriers skipped, the ranks run one after the other)."""
    from sde_diffusion.jobs.generation import Conditioning, generate_and_score
    config, sde, dataset, model = toy_run

    def scored(batch_size: int, folder: str, world=distributed.World()):
        c = configured(config, "ancestral", batch_size)
        settings = sampling.settings_from_config(c, sde)
        return generate_and_score(c, sde, Conditioning(c, sde, model, dataset), dataset, "cpu", tmp_path / folder,
                                  (7, 1), settings, 11, None, {"checkpoint": "test"}, world)[0]
    alone = scored(4, "one")
    monkeypatch.setattr(distributed, "barrier", lambda world: None)
    assert scored(3, "two", distributed.World(rank=1, world_size=2)) is None
    assert sorted(p.name for p in (tmp_path / "two").glob("round_*")) == ["round_00001.npz", "round_00003.npz"]
    shared = scored(3, "two", distributed.World(rank=0, world_size=2))
    assert alone.shape == shared.shape == (11, 2)
    torch.testing.assert_close(shared, alone, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("method", ["pc", "ancestral", "ddim", "dpm_solver_sde", "edm_sde", "restart", "heun"])
def test_a_sample_is_its_seed_whatever_its_batch(method):
    """sample() with SampleGenerators([s0, s1, s2]) gives, in row 1, what SampleGenerators([s1]) gives alone."""
    sde = VPSDE()
    score_fn = default_mixture().marginal_score_fn(sde)
    options = dict(steps=5, grid="logsnr", corrector="ald") if method == "pc" else dict(steps=5, grid="logsnr")
    three, _ = sampling.sample(score_fn, sde, (3, 2), method, generator=SampleGenerators([11, 12, 13]), **options)
    one, _ = sampling.sample(score_fn, sde, (1, 2), method, generator=SampleGenerators([12]), **options)
    torch.testing.assert_close(three[1:2], one, rtol=0, atol=1e-6)
    assert (three[0] - three[1]).abs().max() > 1e-3


def test_per_sample_draws_and_the_plain_generator():
    """Row i of a per-sample draw is generator i's own draw; a torch.Generator draws as torch.randn does (the prior
    and the samplers' noise, bit for bit)."""
    z = randn((3, 2, 2), SampleGenerators([5, 6, 7]))
    assert torch.equal(z[2], torch.randn((2, 2), generator=torch.Generator().manual_seed(7)))
    for sde in (VPSDE(), VESDE()):
        prior = sde.prior_sampling((4, 3), generator=torch.Generator().manual_seed(3))
        assert torch.equal(prior, sde.prior_std * torch.randn(4, 3, generator=torch.Generator().manual_seed(3)))
        rows = sde.prior_sampling((2, 3), generator=SampleGenerators([3, 4]))
        assert torch.equal(rows[0], sde.prior_std * torch.randn(3, generator=torch.Generator().manual_seed(3)))
    x = torch.zeros(4, 3)
    assert torch.equal(sampling.terms.noise(x, torch.Generator().manual_seed(2)),
                       torch.randn(4, 3, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="2 per-sample generators for 3 samples"):
        sampling.sample(lambda y, t: -y, VPSDE(), (3, 2), "ddim", steps=2, generator=SampleGenerators([1, 2]))


def test_torchsde_takes_one_brownian_seed_from_all_samples():
    """The `sde` sampler's Brownian tree serves the batch: reproducible with the same seeds, documented as
    depending on the batch."""
    sde = VPSDE()
    score_fn = default_mixture().marginal_score_fn(sde)
    runs = [sampling.sample(score_fn, sde, (3, 2), "sde", steps=4, generator=SampleGenerators([1, 2, 3]))[0]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert "depends on the other samples" in " ".join(sampling.SAMPLERS["sde"].fn.__doc__.split())
