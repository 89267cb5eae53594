"""Sampling controls of the framework: clipping and dynamic thresholding of x̂₀ at every score evaluation
(`sample(..., clip_x0=, threshold=)`, step for step against diffusers' DDPMScheduler), and the x̂₀ the callback
receives (against a Gaussian's exact posterior mean)."""
from __future__ import annotations

import pytest
import torch

from sde_diffusion import sampling
from sde_diffusion.config import ConfigError
from sde_diffusion.sampling import SAMPLERS, sample
from sde_diffusion.sampling.controls import controlled, dynamic_threshold
from sde_diffusion.sdes import VPSDE
from sde_diffusion.toy import ar1_gaussian, default_mixture

pytestmark = pytest.mark.usefixtures("one_thread")

N = 40  # steps of the DDPM chain
RTOL = 1e-4  # per sample: max |ours − theirs| ≤ RTOL · max |theirs|


def per_sample_error(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    return (ours - theirs).abs().flatten(1).amax(1) / theirs.abs().flatten(1).amax(1)


def toy_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A predicted noise whose x̂₀ = (x − σ·ε)/α leaves [−1, 1] at most levels; t ∈ [0, 1] (batch,) or a float."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
    return (0.3 + 0.4 * t) * x + 0.1


def ddpm_run(x_T: torch.Tensor, seed: int, **scheduler_options) -> torch.Tensor:
    """diffusers' DDPMScheduler (β linear in N steps, σ_t² = β_t) on toy_eps, noise from Generator(seed)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (a test-time dependency) is not installed")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=N, beta_start=0.1 / N, beta_end=20.0 / N,
                                        beta_schedule="linear", variance_type="fixed_large", **scheduler_options)
    scheduler.set_timesteps(N)
    g, x = torch.Generator().manual_seed(seed), x_T.clone()
    for i in scheduler.timesteps:
        x = scheduler.step(toy_eps(x, int(i) / (N - 1)), i, x, generator=g).prev_sample
    return x


def our_run(x_T: torch.Tensor, seed: int, **controls) -> torch.Tensor:
    """Our ancestral sampler on the same chain (grid i/(N−1), noise on every step, the final Tweedie step)."""
    sde = VPSDE(N=N, schedule="linear_chain")

    def score_fn(x, t):
        return -toy_eps(x, t) / sde.sigma(t).reshape(-1, *[1] * (x.ndim - 1))
    grid = torch.arange(N - 1, -1, -1, dtype=torch.float64) / (N - 1)
    x, nfe = sample(score_fn, sde, x_T.shape, "ancestral", grid=grid, x_T=x_T, noise_last=True,
                    generator=torch.Generator().manual_seed(seed), **controls)
    assert nfe == N
    return x


def test_clip_x0_is_diffusers_ddpm_clip_sample_step_for_step():
    x_T = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    theirs = ddpm_run(x_T, 21, clip_sample=True, clip_sample_range=1.0)
    ours = our_run(x_T, 21, clip_x0=1.0)
    assert per_sample_error(ours, theirs).max() <= RTOL, per_sample_error(ours, theirs).tolist()
    assert ours.abs().max() <= 1.0 + 1e-5  # the last step returns the clipped x̂₀
    unclipped = our_run(x_T, 21)
    assert per_sample_error(unclipped, theirs).min() > 0.1  # clipping mattered
    assert per_sample_error(unclipped, ddpm_run(x_T, 21, clip_sample=False)).max() <= RTOL


def test_threshold_is_diffusers_ddpm_dynamic_thresholding_step_for_step():
    """Imagen's rule is diffusers' thresholding=True with an unbounded sample_max_value."""
    x_T = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    theirs = ddpm_run(x_T, 22, clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.9,
                      sample_max_value=1e9)
    ours = our_run(x_T, 22, threshold=0.9)
    assert per_sample_error(ours, theirs).max() <= RTOL, per_sample_error(ours, theirs).tolist()
    assert per_sample_error(our_run(x_T, 22), theirs).min() > 0.1


def test_the_controlled_score_gives_the_thresholded_x0_of_the_formula():
    """x̂₀' read back from the controlled score = clamp(x̂₀, −s, s)/s, s = max(1, quantile_p |x̂₀|) per sample."""
    sde, p = VPSDE(), 0.8
    scales = torch.tensor([0.3, 1, 2, 4]).reshape(-1, 1, 1, 1)
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * scales
    t = torch.full((4,), 0.2)

    def score_fn(y, s):
        return -0.5 * y
    alpha, sigma = (v(t.double()).float().reshape(-1, 1, 1, 1) for v in (sde.alpha, sde.sigma))
    x0 = (x + sigma**2 * score_fn(x, t)) / alpha
    s = torch.quantile(x0.abs().flatten(1), p, dim=1).clamp(min=1).reshape(-1, 1, 1, 1)
    expected = torch.clamp(x0, -s, s) / s
    got = (x + sigma**2 * controlled(score_fn, sde, threshold=p)(x, t)) / alpha
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dynamic_threshold(x0, p), expected, rtol=0, atol=1e-6)
    in_percent = (x + sigma**2 * controlled(score_fn, sde, threshold=100 * p)(x, t)) / alpha  # 80 (%) = 0.8
    torch.testing.assert_close(in_percent, got, rtol=0, atol=0)
    changed = (got - x0).abs().flatten(1).amax(1) > 1e-3
    assert changed.tolist() == [False, True, True, True]  # the first sample's quantile is below 1: left alone
    clipped = (x + sigma**2 * controlled(score_fn, sde, clip_x0=0.5)(x, t)) / alpha
    torch.testing.assert_close(clipped, x0.clamp(-0.5, 0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(clip_x0=0.0), dict(clip_x0=-1.0), dict(threshold=0.0), dict(threshold=1.0),
                                 dict(threshold=100.0)])
def test_bad_controls_are_value_errors(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        sample(lambda x, t: -x, VPSDE(), (2, 2), "ddim", steps=2, **bad)


def test_config_keys_reach_sample_and_are_checked():
    from configs import toy_gmm
    from sde_diffusion.sdes import sde_from_config
    config = toy_gmm.get_config()
    config.sampling.clip_x0, config.sampling.threshold = 1.0, 0.995
    settings = sampling.settings_from_config(config, sde_from_config(config))
    assert settings["clip_x0"] == 1.0 and settings["threshold"] == 0.995
    config.sampling.threshold = None
    assert "threshold" not in sampling.settings_from_config(config, sde_from_config(config))
    for key, value in (("clip_x0", 0.0), ("threshold", 100.0)):
        config = toy_gmm.get_config()
        config.sampling[key] = value
        with pytest.raises(ConfigError, match=f"sampling.{key}={value}"):
            sampling.check_config(config)
    assert sampling.parse_spec("ddim:clip_x0=1,threshold=0.99") == ("ddim", {"clip_x0": 1.0, "threshold": 0.99})
    with pytest.raises(ValueError, match="clip_x0"):
        sampling.parse_spec("ddim:clip_x0=0")


def test_every_sampler_takes_clip_x0():
    """One short run each: the same NFE as without it, and the result (a Tweedie step's or the sampler's own x̂₀)
    inside [−c, c], where the unclipped one is not."""
    sde, c = VPSDE(), 0.5
    score_fn = default_mixture().marginal_score_fn(sde)
    loose = {"adaptive_sde": dict(rtol=0.5, atol=0.5)}
    for name in sorted(SAMPLERS):
        options = dict(steps=3, grid="logsnr", generator=torch.Generator().manual_seed(0), **loose.get(name, {}))
        if SAMPLERS[name].adaptive:
            options.pop("grid")
        x, nfe = sample(score_fn, sde, (4, 2), name, clip_x0=c, **options)
        options["generator"] = torch.Generator().manual_seed(0)
        free, free_nfe = sample(score_fn, sde, (4, 2), name, **options)
        assert x.abs().max() <= c + 1e-5, name
        assert free.abs().max() > c, name
        assert nfe == free_nfe or SAMPLERS[name].adaptive, name


def test_callback_gets_the_denoised_estimate_of_each_step():
    """x0 of callback(i, t, x, x0) is E[x₀ | x_t = x] = μ + Σα(α²Σ + σ²I)⁻¹(x − αμ) of the Gaussian (computed
    from its parameters, not its score); the last call's is the returned sample. 3-argument callbacks still work."""
    sde, gaussian, steps = VPSDE(), ar1_gaussian(dim=4), 5
    seen, old_style = [], []

    def posterior_mean(x, t):
        alpha, sigma, cov = sde.alpha(t), sde.sigma(t), gaussian.cov
        gain = alpha * cov @ torch.linalg.inv(alpha**2 * cov + sigma**2 * torch.eye(4, dtype=torch.float64))
        return gaussian.mean + (x.double() - alpha * gaussian.mean) @ gain.T
    x, _ = sample(gaussian.marginal_score_fn(sde), sde, (6, 4), "ddim", steps=steps, grid="logsnr",
                  generator=torch.Generator().manual_seed(1), callback=lambda i, t, y, x0: seen.append((i, t, y, x0)))
    assert [i for i, *_ in seen] == list(range(steps))
    for i, t, y, x0 in seen[:-1]:
        torch.testing.assert_close(x0.double(), posterior_mean(y, t.double()), rtol=1e-4, atol=1e-4)
    assert torch.equal(seen[-1][3], x)
    torch.testing.assert_close(x.double(), posterior_mean(seen[-1][2], seen[-1][1].double()), rtol=1e-4, atol=1e-4)
    again, _ = sample(gaussian.marginal_score_fn(sde), sde, (6, 4), "ddim", steps=steps, grid="logsnr",
                      generator=torch.Generator().manual_seed(1), callback=lambda i, t, y: old_style.append(i))
    assert old_style == list(range(steps)) and torch.equal(again, x)
    clipped = []
    sample(gaussian.marginal_score_fn(sde), sde, (6, 4), "ddim", steps=steps, clip_x0=0.2,
           callback=lambda *args: clipped.append(args[3]))
    assert all(x0.abs().max() <= 0.2 + 1e-5 for x0 in clipped)
