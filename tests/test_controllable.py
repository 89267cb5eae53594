"""Inpainting and colorization against exact Gaussian conditionals, through every sampler.

The oracles (sde_diffusion/toy.py): `inpainting_oracle()`, a 6-D Gaussian with AR(1) correlations ρ = 0.9 and
coordinates 0 and 3 known at 1.5 std above their means, and `colorization_oracle()`, two RGB pixels with correlated
colours and a known grey level. The score is the exact score of the diffused Gaussian and the answer is the Gaussian
conditioning formula, so the measured errors are the conditioning method's. Errors (see
`metrics_toy.gaussian_moment_errors`): ‖m̂ − μ‖/√tr Σ and ‖Ĉ − Σ‖_F/‖Σ‖_F, with noise floors (RMS errors of 2000
exact samples) 0.022 and 0.042 (inpainting), 0.022 and 0.038 (colorization). The bounds sit just above the values
measured with these seeds (`python benchmarks/inpainting.py --quick` prints the same cases).
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import run_lib
from sde_diffusion import controllable
from sde_diffusion.checkpoints import save_checkpoint
from sde_diffusion.config import ConfigError, default_config, validate_config
from sde_diffusion.training.ema import ExponentialMovingAverage
from sde_diffusion.metrics_toy import gaussian_moment_errors
from sde_diffusion.models import create_model
from sde_diffusion.sampling import auto_centre, sample
from sde_diffusion.sampling.registry import get_sampler
from sde_diffusion.sdes import VESDE, VPSDE
from sde_diffusion.toy import colorization_oracle, inpainting_oracle

pytestmark = pytest.mark.usefixtures("one_thread")

N, SEED = 2000, 1
SDES = {"vp": VPSDE, "ve": VESDE}
# dpm_solver on the λ-uniform grid the bounds below were measured on (on its default sech grid replacement alone is
# already near the colour covariance's noise floor, which leaves resampling nothing to show there)
SAMPLERS = {"pc": ("pc", 100, {}), "dpm_solver": ("dpm_solver", 20, dict(order=3, grid="logsnr"))}
REPAINT_ROUNDS = 5
GREY_TOLERANCE = 1e-6  # float32 rounding of decouple → couple for channel values of order 1


def colour_conditional(data, grey):
    """Exact mean and covariance of the colour coordinates (decoupled channels 1, 2) given the grey level."""
    pixels = grey.numel()
    decoupled = data.linear_map(torch.kron(controllable.COLOR_BASIS, torch.eye(pixels, dtype=torch.float64)))
    return decoupled.conditional(torch.arange(3 * pixels) < pixels, controllable.GREY_SCALE * grey.flatten().double())


def run_inpainting(sde_name, sampler, method):
    sde, (kind, steps, options) = SDES[sde_name](), SAMPLERS[sampler]
    data, mask, x_known = inpainting_oracle()
    constraint = controllable.inpainting(sde, x_known[None].float(), mask[None], method=method,
                                         resample=REPAINT_ROUNDS)
    x, nfe = sample(data.marginal_score_fn(sde), sde, (N, data.dim), kind, steps=steps,
                    generator=torch.Generator().manual_seed(SEED), constraint=constraint, **options)
    assert torch.equal(x[:, mask], x_known[mask].float().expand(N, -1)), "known coordinates must come out as given"
    return gaussian_moment_errors(x[:, ~mask], *data.conditional(mask, x_known[mask])), nfe


def run_colorization(sde_name, sampler, method):
    sde, (kind, steps, options) = SDES[sde_name](), SAMPLERS[sampler]
    data, grey = colorization_oracle()
    pixels = grey.numel()
    constraint = controllable.colorization(sde, grey.float(), method=method, resample=REPAINT_ROUNDS)
    x, nfe = sample(data.marginal_score_fn(sde), sde, (N, 3, pixels), kind, steps=steps,
                    generator=torch.Generator().manual_seed(SEED), constraint=constraint, **options)
    torch.testing.assert_close(controllable.to_grey(x), grey.float().expand(N, 1, pixels), rtol=0,
                               atol=GREY_TOLERANCE)
    colour = controllable.decouple(x, controllable.COLOR_BASIS)[:, 1:].reshape(N, 2 * pixels)
    return gaussian_moment_errors(colour, *colour_conditional(data, grey)), nfe


# (sde, sampler) → ((mean, cov) error bounds of replacement, of repaint with 5 rounds); measured values in comments.
# pc: 100 Euler–Maruyama steps; dpm_solver: order 3, 20 steps (first order after RePaint's rounds: sampling/fast.py).
INPAINTING_BOUNDS = {
    ("vp", "pc"): ((1.15, 1.2), (0.08, 0.07)),  # replacement 1.053, 1.086; repaint 0.068, 0.057
    ("ve", "pc"): ((1.15, 1.1), (0.07, 0.1)),  # replacement 1.035, 0.993; repaint 0.056, 0.085
    ("vp", "dpm_solver"): ((1.8, 2.45), (0.13, 0.145)),  # replacement 1.650, 2.239; repaint 0.115, 0.127
    ("ve", "dpm_solver"): ((1.8, 2.45), (0.13, 0.14)),  # replacement 1.629, 2.220; repaint 0.109, 0.120
}
# Colorization is a milder test of conditioning: the grey level is nearly the colour covariance's top principal
# direction, so the colour coordinates depend on it only weakly and replacement's covariance is already at the
# noise floor with pc. Its mean error is not: resampling brings it down to the floor.
COLORIZATION_BOUNDS = {
    ("vp", "pc"): ((0.095, 0.045), (0.035, 0.03)),  # replacement 0.081, 0.033; repaint 0.028, 0.019
    ("ve", "pc"): ((0.08, 0.05), (0.03, 0.05)),  # replacement 0.066, 0.042; repaint 0.023, 0.043
    ("vp", "dpm_solver"): ((0.155, 0.105), (0.03, 0.035)),  # replacement 0.139, 0.092; repaint 0.021, 0.027
    ("ve", "dpm_solver"): ((0.15, 0.1), (0.025, 0.04)),  # replacement 0.133, 0.087; repaint 0.014, 0.032
}


@pytest.mark.parametrize("case", INPAINTING_BOUNDS, ids="-".join)
def test_inpainting_against_the_exact_conditional(case):
    (replacement_bound, repaint_bound) = INPAINTING_BOUNDS[case]
    replacement, nfe_replacement = run_inpainting(*case, "replacement")
    repaint, nfe_repaint = run_inpainting(*case, "repaint")
    steps = SAMPLERS[case[1]][1]
    assert nfe_replacement == steps + 1 and nfe_repaint == steps * (1 + REPAINT_ROUNDS) + 1
    assert all(e < b for e, b in zip(replacement + repaint, replacement_bound + repaint_bound)), (replacement, repaint)
    # replacement is far off (about one conditional std in the mean); resampling gets within a few noise floors
    assert all(b < a / 8 for a, b in zip(replacement, repaint)), (replacement, repaint)


@pytest.mark.parametrize("case", COLORIZATION_BOUNDS, ids="-".join)
def test_colorization_against_the_exact_conditional(case):
    (replacement_bound, repaint_bound) = COLORIZATION_BOUNDS[case]
    replacement, _ = run_colorization(*case, "replacement")
    repaint, _ = run_colorization(*case, "repaint")
    assert all(e < b for e, b in zip(replacement + repaint, replacement_bound + repaint_bound)), (replacement, repaint)
    assert repaint[0] < replacement[0] / 2, (replacement, repaint)
    if case[1] == "dpm_solver":  # there replacement's covariance is off too, and resampling fixes it
        assert repaint[1] < replacement[1] / 2, (replacement, repaint)


# --------------------------------------------------------------------------------------------------
# Every sampler takes a constraint
# --------------------------------------------------------------------------------------------------
# id → (method, steps, options, score calls of `steps` steps without a constraint or denoising; None: adaptive)
STEPS = 4
SAMPLER_CASES = {
    "pc": ("pc", {}, STEPS),
    "pc_langevin": ("pc", dict(corrector="langevin"), 2 * STEPS),
    "pc_ancestral_ald": ("pc", dict(predictor="ancestral_sampling", corrector="ald"), 2 * STEPS),
    "ancestral": ("ancestral", {}, STEPS),
    "ode": ("ode", {}, None),
    "ode_scipy": ("ode", dict(backend="scipy"), None),
    "sde_euler": ("sde", {}, STEPS),
    "sde_srk": ("sde", dict(sde_method="srk"), 4 * STEPS),
    "ddim": ("ddim", {}, STEPS),
    "ddim_eta1": ("ddim", dict(eta=1.0), STEPS),
    "dpm_solver": ("dpm_solver", dict(order=3), STEPS),
    "heun": ("heun", {}, 2 * STEPS - 1),
}
ROUNDS = 2


@pytest.mark.parametrize("method", controllable.METHODS)
@pytest.mark.parametrize("case", SAMPLER_CASES)
def test_every_sampler_returns_known_coordinates_exactly(case, method):
    kind, options, plain_calls = SAMPLER_CASES[case]
    sde, (data, mask, x_known) = VPSDE(), inpainting_oracle()
    calls, updates = [], []

    def score_fn(x, t):
        calls.append(1)
        return data.marginal_score_fn(sde)(x, t)
    if get_sampler(kind).grid_for(STEPS) == "auto":
        auto_centre(score_fn, sde, (16, data.dim))  # the few-step grid's one-off probe, not counted in nfe
        calls.clear()
    constraint = controllable.inpainting(sde, x_known[None].float(), mask[None], method=method, resample=ROUNDS)
    x, nfe = sample(score_fn, sde, (16, data.dim), kind, steps=STEPS, generator=torch.Generator().manual_seed(0),
                    constraint=constraint, callback=lambda i, t, x: updates.append(i), **options)
    assert torch.equal(x[:, mask], x_known[mask].float().expand(16, -1))
    assert torch.isfinite(x).all() and not torch.equal(x[0, ~mask], x[1, ~mask])
    assert nfe == len(calls)
    rounds = ROUNDS * len(updates) if method == "repaint" else 0  # one score call per round, `resample` per update
    if plain_calls is not None:
        assert len(updates) == STEPS and nfe == plain_calls + rounds + 1
    else:  # adaptive: 6 stages per accepted step, plus the derivative re-evaluated after all but the last
        assert nfe >= 7 * len(updates) - 1 + rounds + 1


# id → (method, steps, options): RePaint through every sampler, 1000 samples on VP. Measured mean errors,
# replacement → repaint: ancestral 1.25 → 0.13, ddim 1.65 → 0.13, heun 1.42 → 0.29, sde euler 1.10 → 0.12,
# sde srk 1.62 → 0.21, ode 1.91 → 0.19, pc + langevin 1.06 → 0.14. RePaint's rounds spent on states a sampler
# then discards (e.g. Runge–Kutta stages) leave it at replacement's error.
REPAINT_CASES = {
    "ancestral": ("ancestral", 30, {}),
    "ddim": ("ddim", 20, {}),
    "heun": ("heun", 10, {}),
    "sde_euler": ("sde", 30, {}),
    "sde_srk": ("sde", 10, dict(sde_method="srk", grid="logsnr")),
    "ode": ("ode", 1, {}),
    "pc_langevin": ("pc", 15, dict(corrector="langevin")),
}


@pytest.mark.parametrize("case", REPAINT_CASES)
def test_repaint_rounds_reach_every_sampler(case):
    kind, steps, options = REPAINT_CASES[case]
    sde, (data, mask, x_known) = VPSDE(), inpainting_oracle()
    errors = {}
    for method in controllable.METHODS:
        constraint = controllable.inpainting(sde, x_known[None].float(), mask[None], method=method, resample=5)
        x, _ = sample(data.marginal_score_fn(sde), sde, (1000, data.dim), kind, steps=steps,
                      generator=torch.Generator().manual_seed(1), constraint=constraint, **options)
        errors[method] = gaussian_moment_errors(x[:, ~mask], *data.conditional(mask, x_known[mask]))[0]
    assert errors["repaint"] < min(0.35, errors["replacement"] / 4), errors


@pytest.mark.parametrize("case", ["pc", "ode", "dpm_solver", "heun"])
def test_every_sampler_keeps_the_grey_level(case):
    kind, options, _ = SAMPLER_CASES[case]
    sde, (data, grey) = VESDE(), colorization_oracle()
    constraint = controllable.colorization(sde, grey, method="repaint", resample=ROUNDS)
    x, _ = sample(data.marginal_score_fn(sde), sde, (16, 3, grey.numel()), kind, steps=STEPS, dtype=torch.float64,
                  generator=torch.Generator().manual_seed(0), constraint=constraint, **options)
    # float64 here: after 4 steps colours can be far out, and rounding is relative to the channel values
    torch.testing.assert_close(controllable.to_grey(x), grey.expand(16, 1, -1), rtol=0, atol=1e-12)


def test_replacement_draws_the_forward_marginal_of_the_known_part():
    """Known coordinates ← α(t)·y + σ(t)·z with z the generator's next normal draw; the others are untouched."""
    sde, (data, mask, x_known) = VPSDE(), inpainting_oracle()
    t = torch.tensor(0.3, dtype=torch.float64)
    x = torch.randn(5, data.dim, dtype=torch.float64)
    out = controllable.inpainting(sde, x_known[None], mask[None]).replace(x, t, torch.Generator().manual_seed(3))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = sde.alpha(t) * x_known + sde.sigma(t) * z
    torch.testing.assert_close(out[:, mask], expected[:, mask])
    assert torch.equal(out[:, ~mask], x[:, ~mask])
    # colorization: the same in the decoupled space, on the grey channel only
    grey = torch.rand(1, 1, 4, dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    out = controllable.colorization(sde, grey).replace(x, t, torch.Generator().manual_seed(3))
    before, after = (controllable.decouple(v, controllable.COLOR_BASIS) for v in (x, out))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(after[:, 0], sde.alpha(t) * math.sqrt(3) * grey[:, 0] + sde.sigma(t) * z[:, 0])
    torch.testing.assert_close(after[:, 1:], before[:, 1:])


def test_reflection_round_is_exact_for_gaussian_data():
    """One jump back and reflection through E[x_t | x_{t'}] maps samples of p_t to samples of p_t (Gaussian data):
    the covariance of 200 000 reflected points matches α²Σ + σ²I to sampling accuracy (measured relative error
    0.0036, that of the points before: 0.0029). An ancestral way back, E[x_t | x_{t'}] plus isotropic noise, misses
    it by 0.24 (DDPM posterior noise) or 0.23 (β)."""
    sde, (data, mask, x_known) = VPSDE(), inpainting_oracle()
    t, t_prev = torch.tensor(0.05, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    x0 = data.sample(200_000, generator)
    x = sde.alpha(t) * x0 + sde.sigma(t) * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    constraint = controllable.inpainting(sde, x_known[None], mask[None], method="repaint")
    jumped = constraint.jump_back(x, t, t_prev, generator)
    out = constraint.reflect_back(data.marginal_score_fn(sde), x, jumped, t, t_prev)
    exact = sde.alpha(t) ** 2 * data.cov + sde.sigma(t) ** 2 * torch.eye(data.dim, dtype=torch.float64)
    assert ((torch.cov(out.T) - exact).norm() / exact.norm()).item() < 0.006
    assert (out - x).norm(dim=1).mean() > 0.1  # it moved


def test_bad_constraint_inputs_are_rejected_with_a_clear_message():
    sde = VPSDE()
    with pytest.raises(ValueError, match="conditioning method"):
        controllable.inpainting(sde, torch.zeros(1, 4), torch.ones(1, 4), method="smc")
    with pytest.raises(ValueError, match="resample"):
        controllable.inpainting(sde, torch.zeros(1, 4), torch.ones(1, 4), method="repaint", resample=0)
    with pytest.raises(ValueError, match="only 0"):
        controllable.inpainting(sde, torch.zeros(1, 4), torch.full((1, 4), 0.5))
    with pytest.raises(ValueError, match="broadcast"):
        controllable.inpainting(sde, torch.zeros(1, 4), torch.ones(1, 3))
    with pytest.raises(ValueError, match="batch 1"):
        sample(lambda x, t: -x, sde, (8, 5), "ddim", steps=2,
               constraint=controllable.inpainting(sde, torch.zeros(1, 4), torch.ones(1, 4)))
    with pytest.raises(ValueError, match=r"\(batch, 1, \.\.\.\)"):
        controllable.colorization(sde, torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="batch 1"):  # colorization of 1-channel images
        sample(lambda x, t: -x, sde, (2, 1, 4, 4), "ddim", steps=2,
               constraint=controllable.colorization(sde, torch.zeros(2, 1, 4, 4)))


# --------------------------------------------------------------------------------------------------
# --mode sample: config keys and the picture
# --------------------------------------------------------------------------------------------------
def tiny_config(dataset="digits", root="data"):
    config = default_config()
    config.data.dataset, config.data.root = dataset, str(root)
    if dataset == "cifar10":
        config.data.num_channels, config.data.image_size = 3, 32
    config.model.nf, config.model.ch_mult, config.model.num_res_blocks = 32, (1,), 1
    config.model.attn_resolutions, config.model.dropout = (), 0.0
    config.sampling.method, config.sampling.steps = "ddim", 3
    config.eval.num_samples, config.eval.batch_size, config.sampling.num_grid_samples = 5, 4, 5
    config.device, config.training.batch_size = "cpu", 4
    return config


def write_checkpoint(config, workdir):
    model = create_model(config)
    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    save_checkpoint(workdir / "checkpoints" / "checkpoint_1.pth",
                    {"model": model.state_dict(), "ema": ema.state_dict(), "step": 0})


def left_half_mask_png(path, size):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, : size // 2] = 255  # white = known
    Image.fromarray(mask).save(path)
    return path


def test_sample_mode_inpaints_test_images_and_writes_the_grid(tmp_path):
    config = tiny_config()
    config.sampling.inpaint_mask = str(left_half_mask_png(tmp_path / "mask.png", 8))
    config.sampling.conditioning_method = "repaint"
    config.sampling.resample = 1
    write_checkpoint(config, tmp_path)
    run_lib.sample(config, tmp_path)
    pictures = list((tmp_path / "samples").glob("checkpoint_1_inpaint_repaint_ddim_nfe*.png"))
    assert len(pictures) == 1 and pictures[0].name.endswith("nfe7.png")  # 3 steps × (1 + 1 round) + Tweedie
    width, height = Image.open(pictures[0]).size
    assert abs(width / height - 28 / 46) < 0.02  # 3 columns (input | sample | original) × 5 rows of 8 px + padding
    saved = np.load(pictures[0].with_suffix(".npz"))
    samples, originals, mask = (torch.from_numpy(saved[k]) for k in ("samples", "originals", "mask"))
    assert samples.shape == originals.shape == (5, 1, 8, 8) and mask.shape == (1, 1, 8, 8)
    known = mask.expand_as(samples)
    torch.testing.assert_close(samples[known], originals[known], rtol=0, atol=1e-6)  # [−1, 1] → [0, 1] rounding
    assert (samples[~known] - originals[~known]).abs().max() > 0.1


def _write_fake_cifar(root, n=3):
    import pickle
    from sde_diffusion.data import datasets
    folder = root / datasets.CIFAR10_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in datasets.CIFAR10_TRAIN_BATCHES + ["test_batch"]:
        batch = {b"labels": rng.integers(0, 10, n).tolist(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_sample_mode_colorizes_and_keeps_the_grey_level(tmp_path):
    _write_fake_cifar(tmp_path / "data")
    config = tiny_config("cifar10", tmp_path / "data")
    config.sampling.colorize = True
    write_checkpoint(config, tmp_path)
    run_lib.sample(config, tmp_path)
    (picture,) = (tmp_path / "samples").glob("checkpoint_1_colorize_replacement_ddim_nfe4.png")
    saved = np.load(picture.with_suffix(".npz"))
    samples, inputs = torch.from_numpy(saved["samples"]), torch.from_numpy(saved["inputs"])
    assert samples.shape == (3, 3, 32, 32) and "mask" not in saved  # 3 test images in the fake split
    # float32 rounding, relative to the channel values (an untrained network's colours go far out of [0, 1])
    scale = samples.abs().max().clamp(min=1.0)
    torch.testing.assert_close(controllable.to_grey(samples), inputs[:, :1], rtol=0, atol=GREY_TOLERANCE * scale)


def test_conditional_sampling_config_is_validated(tmp_path):
    mask = str(left_half_mask_png(tmp_path / "mask.png", 8))
    cases = [
        (dict(conditioning_method="smc", inpaint_mask=mask), "sampling.conditioning_method"),
        (dict(resample=0, inpaint_mask=mask), "sampling.resample"),
        (dict(inpaint_mask=str(tmp_path / "missing.png")), "does not exist"),
        (dict(inpaint_mask=str(left_half_mask_png(tmp_path / "big.png", 16))), "does not fit"),
        (dict(inpaint_mask=str(tmp_path / "mask.jpg")), ".png or .npy"),
        (dict(inpaint_image=mask), "nothing to condition on"),
        (dict(inpaint_mask=mask, colorize=True), "two different tasks"),
        (dict(colorize=True), "3-channel"),
    ]
    np.save(tmp_path / "bad.npy", np.full((8, 8), 0.5))
    cases.append((dict(inpaint_mask=str(tmp_path / "bad.npy")), "only 0"))
    for overrides, message in cases:
        config = tiny_config()
        for key, value in overrides.items():
            config.sampling[key] = value
        with pytest.raises(ConfigError, match=message):
            validate_config(config)
    config = tiny_config()
    config.sampling.inpaint_mask, config.sampling.inpaint_image = mask, mask  # a white/black PNG as the image
    validate_config(config)
    toy = default_config()
    toy.data.dataset, toy.model.name, toy.sampling.inpaint_mask = "gmm", "mlp", mask
    with pytest.raises(ConfigError, match="image data"):
        validate_config(toy)
