"""EDM2's magnitude-preserving U-Net (`model.name = "edm2"`, Karras et al. 2024): the paper's parameter counts, unit
magnitudes of activations and weights before and after training (and a broken variant that loses them), the learned
uncertainty u(σ) in the loss (w·L/exp(u) + u), the inverse-square-root learning rate, the config checks, and a tiny
end-to-end run on 8×8 digits: EDM process and preconditioning, TrainStep, sampling."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from configs.edm_digits import get_config as edm_digits_config
from sde_diffusion import sampling
from sde_diffusion.config import default_config, validate_config
from sde_diffusion.errors import ConfigError
from sde_diffusion.jobs import builder
from sde_diffusion.models import create_model, edm2, get_score_fn
from sde_diffusion.sdes import EDMSDE
from sde_diffusion.training import optim
from sde_diffusion.training.objectives import Objective
from sde_diffusion.training.step import TrainStep

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_config(**model):
    """An EDM2 U-Net on 8×8 digits (two resolutions, attention at 4×4) under EDM's process and preconditioning."""
    config = edm_digits_config()
    m = config.model
    m.name, m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = "edm2", 16, (1, 2), 1, (4,), 0.0
    for key, value in model.items():
        m[key] = value
    return config


# --------------------------------------------------------------------------------------------------
# The paper's networks
# --------------------------------------------------------------------------------------------------
# Karras et al. 2024, Table 2 (ImageNet-512, 64×64×4 latents, 1000 classes): parameters in millions
PAPER_SIZES = {"XS": (128, 125), "S": (192, 280)}  # name: (model.nf, parameters / 1e6)


@pytest.mark.parametrize("size", sorted(PAPER_SIZES))
def test_paper_configurations_have_the_paper_parameter_counts(size):
    nf, millions = PAPER_SIZES[size]
    config = default_config()
    config.data.image_size, config.data.num_channels = 64, 4
    m = config.model
    m.name, m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions = "edm2", nf, (1, 2, 3, 4), 3, (16, 8)
    m.num_classes, m.attention_head_dim = 1000, 64
    edm2.check_options(config)
    with torch.device("meta"):
        model = create_model(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions  # log-variance head included


def test_config_checks_name_the_key():
    validate_config(tiny_config())
    for changes, key in (({"ch_mult": (1, 2, 2, 2, 2)}, "data.image_size"),  # 8 cannot be halved 4 times
                         ({"attn_resolutions": (2,)}, "model.attn_resolutions"),
                         ({"attention_head_dim": 24}, "model.attention_head_dim"),  # widths 16 and 32
                         ({"conditional": False}, "model.conditional")):
        with pytest.raises(ConfigError, match=key):
            validate_config(tiny_config(**changes))


# --------------------------------------------------------------------------------------------------
# Magnitudes
# --------------------------------------------------------------------------------------------------
LR = 1e-2  # EDM2's reference learning rate (α_ref) order
TRAIN_STEPS = 20
# Every block's output RMS for unit-variance inputs: measured 0.83 … 1.03 at initialisation and 0.75 … 0.97 after
# TRAIN_STEPS Adam steps (emb_gain = 1). "≈ 1" within a factor of 2; an mp_sum without its divisor shrinks each sum
# by √0.58 and compounds along the decoder: 0.24 … 0.75
BLOCK_RMS = (0.5, 2.0)
# |RMS² − 1| of each MPConv's stored weight rows after the steps: forced normalization puts every row at 1 before a
# step, and an Adam step moves each element by about LR at most, so mean(w²) by at most 2·LR + LR². Measured ≤ 2.9e-3;
# without forced normalization the rows keep their N(0, 1) draws: RMS² 0.31 … 2.55
WEIGHT_RMS2_TOLERANCE = 3 * LR


def block_rms(model: nn.Module, gen: torch.Generator):
    """{block name: RMS of its output} in eval mode for x ~ N(0, I) (8, 1, 8, 8), EDM's c_noise of log-normal σ,
    random labels (the null label included)."""
    rms = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: rms.__setitem__(name, out.square().mean()
                                                                                         .sqrt().item()))
             for name, module in model.named_modules() if isinstance(module, edm2.Block)]
    x, sigma = torch.randn(8, 1, 8, 8, generator=gen), torch.exp(-1.2 + 1.2 * torch.randn(8, generator=gen))
    with torch.no_grad():
        model.eval()(x, sigma.log() / 4, torch.randint(0, 11, (8,), generator=gen))
    for hook in hooks:
        hook.remove()
    return rms


def weight_rms2(model: nn.Module):
    """{MPConv name: mean of the weight's squares per output row (cout,)} of the stored weights."""
    return {name: module.weight.detach().flatten(1).square().mean(1) for name, module in model.named_modules()
            if isinstance(module, edm2.MPConv)}


def magnitude_failures():
    """Trains a fresh class-conditional EDM2 U-Net (emb_gain, out_gain set to 1, as learned: they start at 0)
    TRAIN_STEPS Adam steps of EDM's loss on random data, measuring block outputs before and after; returns the
    checks that failed (those at initialisation alone, when some fail there)."""
    torch.manual_seed(0)
    config = tiny_config(num_classes=10)
    model, sde, gen = create_model(config), EDMSDE(), torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gain"):
                p.fill_(1.0)
    failures = [f"init {name}: RMS {r:.3f}" for name, r in block_rms(model, gen).items()
                if not BLOCK_RMS[0] <= r <= BLOCK_RMS[1]]
    if failures:
        return failures
    objective = builder.make_loss_fn(config, sde)
    adam = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    for _ in range(TRAIN_STEPS):
        x0, labels = 0.5 * torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 11, (8,), generator=gen)
        adam.zero_grad()
        objective(get_score_fn(sde, model, labels=labels), x0, generator=gen).backward()
        adam.step()
    failures += [f"weight {name}: RMS² {r.min():.3f} … {r.max():.3f}" for name, r in weight_rms2(model).items()
                 if (r - 1).abs().max() > WEIGHT_RMS2_TOLERANCE]
    failures += [f"trained {name}: RMS {r:.3f}" for name, r in block_rms(model, gen).items()
                 if not BLOCK_RMS[0] <= r <= BLOCK_RMS[1]]
    return failures


def test_block_outputs_and_weights_keep_unit_magnitude():
    assert magnitude_failures() == []


BROKEN = {"mp_sum without its divisor": ("mp_sum", lambda a, b, t: a.lerp(b, t)),
          "no forced weight normalization": ("MPConv.force_normalize_", lambda self: None)}


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_a_broken_variant_fails_the_magnitude_checks(variant, monkeypatch):
    name, replacement = BROKEN[variant]
    owner, _, attribute = name.rpartition(".")
    monkeypatch.setattr(getattr(edm2, owner) if owner else edm2, attribute, replacement)
    assert magnitude_failures()


def test_primitives_preserve_unit_magnitude():
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(4, n, 16, 16, generator=gen) for n in (48, 16, 48))
    rms = lambda v: v.square().mean().sqrt().item()  # noqa: E731
    assert rms(edm2.mp_sum(a, c, 0.3)) == pytest.approx(1, abs=0.02)
    cat = edm2.mp_cat(a, b, 0.5)
    energy = lambda v: v.square().sum().item()  # noqa: E731
    assert rms(cat) == pytest.approx(1, abs=0.02) and energy(cat[:, 48:]) == pytest.approx(energy(cat[:, :48]),
                                                                                          rel=0.05)  # t = ½ each
    assert rms(edm2.mp_silu(a)) == pytest.approx(1, abs=0.02)
    assert rms(edm2.MPFourier(4096)(torch.randn(1, generator=gen))) == pytest.approx(1, abs=0.05)
    torch.testing.assert_close(edm2.normalize(3 * a, dim=1).square().mean(1), torch.ones(4, 16, 16), rtol=1e-3,
                               atol=0)


# --------------------------------------------------------------------------------------------------
# The learned uncertainty in the loss
# --------------------------------------------------------------------------------------------------
class Uncertain(nn.Module):
    """A network x·scale with a log-variance head that returns the parameter `u` for every example and records the
    noise condition it is given."""

    def __init__(self, u: float):
        super().__init__()
        self.scale, self.u = nn.Parameter(torch.tensor(0.3)), nn.Parameter(torch.tensor(u))
        self.forward_condition = self.log_variance_condition = None

    def forward(self, x, cond):
        self.forward_condition = cond
        return self.scale * x

    def log_variance(self, cond):
        self.log_variance_condition = cond
        return self.u.expand(cond.shape[0])


def losses_with_and_without_u(u: float, reduce_mean: bool = True, batch: int = 6):
    """(loss with the uncertainty u, loss of the same draw without it, the network)."""
    sde = EDMSDE()
    objective = Objective(sde, time_sampling="log_normal", weighting="edm", reduce_mean=reduce_mean)
    x0 = torch.randn(batch, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = objective.draw(x0, torch.Generator().manual_seed(1))
    net = Uncertain(u)
    score_fn = get_score_fn(sde, net, parameterization="edm")
    with_u = objective(score_fn, x0, noise=noise)
    plain = objective(lambda x, t: score_fn(x, t), x0, noise=noise)  # the same score, without log_variance
    return with_u, plain, net


@pytest.mark.parametrize("reduce_mean", [True, False])
def test_a_constant_log_variance_c_gives_exp_minus_c_times_the_loss_plus_c(reduce_mean):
    c = 0.7
    with_u, plain, net = losses_with_and_without_u(c, reduce_mean)
    dims = 1 if reduce_mean else 16  # reduce_mean=False: L sums D = 16 dimensions, the NLL adds D·u
    torch.testing.assert_close(with_u, math.exp(-c) * plain + dims * c)
    torch.testing.assert_close(net.log_variance_condition, net.forward_condition)  # the network's noise condition


def test_the_optimal_log_variance_is_the_log_of_the_weighted_error():
    """One example: d loss / d u = 1 − w·L·exp(−u) vanishes at u = log(w·L), and changes sign there."""
    _, weighted_error, _ = losses_with_and_without_u(0.0, batch=1)
    optimum = math.log(weighted_error.item())
    slopes = []
    for u in (optimum - 0.5, optimum, optimum + 0.5):
        loss, _, net = losses_with_and_without_u(u, batch=1)
        loss.backward()
        slopes.append(net.u.grad.item())
    assert slopes[0] < -0.1 and abs(slopes[1]) < 1e-6 and slopes[2] > 0.1


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------------
def test_inverse_sqrt_schedule_decays_after_the_reference_step():
    o = default_config().optim
    o.lr, o.warmup, o.ref_steps = 1.0, 10, 100
    assert optim.learning_rate(400, o) == 1.0  # constant by default
    o.schedule = "inverse_sqrt"
    expected = {5: 0.5, 10: 1.0, 100: 1.0, 400: 0.5, 2500: 0.2}  # warm-up, then 1/√max(step/100, 1)
    for step, lr in expected.items():
        assert optim.learning_rate(step, o) == pytest.approx(lr)
    for key, value in (("schedule", "cosine"), ("ref_steps", 0), ("beta2", 1.0)):
        config = tiny_config()
        config.optim[key] = value
        with pytest.raises(ConfigError, match=f"optim.{key}"):
            validate_config(config)


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------
def test_edm2_trains_on_digits_and_samples():
    config = tiny_config()
    config.training.batch_size = 32
    config.optim.lr, config.optim.warmup, config.optim.schedule, config.optim.ref_steps = 1e-2, 0, "inverse_sqrt", 3
    validate_config(config)
    torch.manual_seed(0)
    sde, dataset, model = builder.build(config, torch.device("cpu"))
    loss_fn = builder.make_loss_fn(config, sde)
    step_fn = TrainStep(model, optim.make_optimizer(model.parameters(), config.optim), builder.make_ema(config, model),
                        loss_fn, config.optim, precision="fp32", device=torch.device("cpu"),
                        noise=torch.Generator().manual_seed(1))
    score_fn = builder.labelled_score_fn(config, sde, model)(None)
    assert hasattr(score_fn, "log_variance")
    x = dataset.train_batch()
    noise = loss_fn.draw(x, torch.Generator().manual_seed(2))

    def fixed_loss() -> float:
        """The loss of one batch and draw, in eval mode."""
        model.eval()
        with torch.no_grad():
            value = loss_fn(score_fn, x, noise=noise).item()
        model.train()
        return value

    before = fixed_loss()
    for step in range(1, 7):
        step_fn(dataset.train_batch(), step, score_fn)
    assert step_fn.report().lr == pytest.approx(1e-2 / math.sqrt(6 / 3))
    after = fixed_loss()
    assert after < before - 0.1, (before, after)
    model.eval()
    with torch.no_grad():
        samples, nfe = sampling.sample(score_fn, sde, (4, 1, 8, 8), "heun", steps=4,
                                       generator=torch.Generator().manual_seed(3))
    assert samples.shape == (4, 1, 8, 8) and torch.isfinite(samples).all() and nfe > 0


def test_edm2_refuses_a_noise_input_or_scale_it_was_not_built_for():
    """The Fourier features expect ¼·ln σ, the layers unit-variance x_t: VP's default 999·t input and VE's unscaled
    x_t are config errors naming the key."""
    from sde_diffusion.config import default_config, validate_config
    from sde_diffusion.errors import ConfigError
    config = default_config()
    m = config.model
    m.name, m.nf, m.ch_mult, m.attn_resolutions = "edm2", 16, (1, 2), (4,)
    with pytest.raises(ConfigError, match="noise_conditioning='log_sigma'"):
        validate_config(config)
    m.noise_conditioning = "log_sigma"
    validate_config(config)  # VP with ε: x_t has unit variance
    config.training.sde, m.parameterization = "vesde", "score"
    with pytest.raises(ConfigError, match="parameterization='edm'"):
        validate_config(config)
    m.parameterization = "edm"
    validate_config(config)
