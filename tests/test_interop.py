"""Loading score_sde_pytorch checkpoints: the reference fixtures in ../shared/fixtures/score_sde_pytorch/ and every
checkpoint in its grid/ folder (the NCSN++ option grid; a fixture added there is tested as it is).

For every fixture, the loaded network reproduces the reference outputs with the model and the EMA weights,
and get_score_fn reproduces the reference score, per sample within 1e-4 of that sample's max |ref| (the
fixture README's suggestion for an independent float32 implementation). Mismatched configs, missing tensors
and the command-line converter are tested on the same files.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sde_diffusion import sdes
from sde_diffusion.checkpoints import load_model_weights
from sde_diffusion.interop import (PREFIX, ReferenceCheckpointError, config_from_score_sde, load_score_sde_pytorch,
                                   read_reference_checkpoint, reference_layout, reference_network_output)
from sde_diffusion.models import create_model, get_score_fn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "score_sde_pytorch"
GRID = FIXTURES / "grid"  # NCSN++ option grid: every checkpoint dropped here is tested
NAMES = ["ddpmpp_vp_small", "ddpmpp_vp_small_perturbed", "ncsnpp_ve_small", "ncsnpp_ve_small_perturbed",
         "ddpm_vp_small", "ddpm_vp_small_perturbed"]
GRID_NAMES = sorted(f"grid/{path.stem}" for path in GRID.glob("*.pth"))
RTOL = 1e-4  # per sample: max |ours − ref| ≤ RTOL · max |ref|

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # see conftest.py
    pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"reference fixtures not found: {FIXTURES} (the shared "
                       "folder ../shared next to the repository is absent)"),
]


def per_sample_error(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """max |ours − ref| / max |ref| for each sample (batch,)."""
    return (ours - ref).abs().flatten(1).amax(1) / ref.abs().flatten(1).amax(1)


def sde_from_meta(s: dict) -> sdes.SDE:
    """The fixture's SDE from its JSON `sde` entry (class VPSDE, subVPSDE or VESDE)."""
    if s["class"] == "VPSDE":
        return sdes.VPSDE(s["beta_0"], s["beta_1"], s["N"])
    if s["class"] == "subVPSDE":
        return sdes.SubVPSDE(s["beta_0"], s["beta_1"], s["N"])
    assert s["class"] == "VESDE", s["class"]
    return sdes.VESDE(s["sigma_min"], s["sigma_max"], s["N"])


class Fixture:
    """A reference checkpoint loaded with load_score_sde_pytorch (raw and EMA weights), with its arrays."""

    def __init__(self, name: str):
        self.name = name
        self.path = FIXTURES / f"{name}.pth"
        self.meta = json.loads((FIXTURES / f"{name}.json").read_text())
        self.arrays = {k: torch.from_numpy(v) for k, v in np.load(FIXTURES / f"{name}.npz").items()}
        self.config, _ = config_from_score_sde(self.meta["config"])
        self.sde = sde_from_meta(self.meta["sde"])
        self.state = read_reference_checkpoint(self.path)
        self.model = load_score_sde_pytorch(self.path, self.config, use_ema=False)
        self.ema_model = load_score_sde_pytorch(self.path, self.config, use_ema=True)


_CACHE = {}


def fixture(name: str) -> Fixture:
    if name not in _CACHE:
        _CACHE[name] = Fixture(name)
    return _CACHE[name]


def reference_std(t: torch.Tensor, sde: sdes.SDE) -> torch.Tensor:
    """The reference VPSDE / subVPSDE marginal_prob std, computed as it does in float32: √(1 − exp(2 log α(t))),
    and 1 − exp(2 log α(t)) for sub-VP.

    At small t the subtraction cancels: at t = 1e-3 the VP std is 1.2e-4 (relative) off the exact σ(t) that
    our SDEs compute with expm1, so the reference score carries that error too.
    """
    log_mean = -0.25 * t**2 * (sde.beta_max - sde.beta_min) - 0.5 * t * sde.beta_min
    one_minus = 1.0 - torch.exp(2.0 * log_mean)
    return one_minus if isinstance(sde, sdes.SubVPSDE) else torch.sqrt(one_minus)


def reference_discrete_std(t: torch.Tensor, N: int, sde: sdes.VPSDE, dtype=torch.float32) -> torch.Tensor:
    """The reference's sqrt_1m_alphas_cumprod[int((N−1) t)], built in float32 as it does (1 − ᾱ_i cancels at
    small i: 8e-5 relative at i = 0), or in `dtype`."""
    betas = torch.linspace(sde.beta_min / N, sde.beta_max / N, N, dtype=dtype)
    return torch.sqrt(1.0 - torch.cumprod(1.0 - betas, dim=0))[((N - 1) * t).long()]


@pytest.mark.parametrize("name", NAMES + GRID_NAMES)
def test_loaded_network_reproduces_reference_outputs(name):
    f = fixture(name)
    x, labels = f.arrays["x"], f.arrays["labels"]
    assert sum(p.numel() for p in f.model.parameters()) == f.meta["param_count_total"]
    with torch.no_grad():
        for model, key in ((f.model, "out_model"), (f.ema_model, "out_ema")):
            error = per_sample_error(reference_network_output(model, f.config, x, labels), f.arrays[key])
            assert error.max() <= RTOL, f"{name} {key}: per-sample relative errors {error.tolist()}"


@pytest.mark.parametrize("name", NAMES + GRID_NAMES)
def test_score_fn_reproduces_reference_score(name):
    f = fixture(name)
    x, t = f.arrays["x"], f.arrays["t"]
    with torch.no_grad():
        score = get_score_fn(f.sde, f.ema_model, continuous=True)(x, t)
    ref = f.arrays["score_ema"]
    if not isinstance(f.sde, sdes.VESDE):  # the reference divided by its float32 std; rescale to the exact σ(t)
        exact = f.sde.sigma(t.double())
        ref = ref * (reference_std(t, f.sde).double() / exact).float()[:, None, None, None]
    error = per_sample_error(score, ref)
    assert error.max() <= RTOL, f"{name} score_ema: per-sample relative errors {error.tolist()}"


@pytest.mark.parametrize("name", GRID_NAMES)
def test_layout_pairs_every_grid_tensor_in_checkpoint_order(name):
    f = fixture(name)
    saved = [k[len(PREFIX):] for k in f.state["model"] if k != PREFIX + "sigmas"]
    layout = reference_layout(f.config)
    assert [entry.ref for entry in layout] == saved
    assert sum(entry.trainable for entry in layout) == f.meta["checkpoint"]["ema_num_shadow_params"]


def _discrete_errors(name):
    f = fixture(name)
    x, t = f.arrays["x"], f.arrays["t"]
    with torch.no_grad():
        score = get_score_fn(f.sde, f.ema_model, continuous=False)(x, t)
    exact = reference_discrete_std(t, f.sde.N, f.sde, torch.float64)  # the reference's step, without round-off
    ref = f.arrays["score_ema_discrete"] * (reference_discrete_std(t, f.sde.N, f.sde).double()
                                            / exact).float()[:, None, None, None]
    return t, per_sample_error(score, ref)


@pytest.mark.parametrize("name", ["ddpm_vp_small", "ddpm_vp_small_perturbed"])
def test_discrete_score_fn_reproduces_reference_score(name):
    t, error = _discrete_errors(name)
    on_grid_side = 999 * t >= 1  # see the next test for t = 1e-3
    assert error[on_grid_side].max() <= RTOL, f"{name} score_ema_discrete: per-sample errors {error.tolist()}"


def test_discrete_score_fn_at_t_1e_3_uses_step_0():
    t, error = _discrete_errors("ddpm_vp_small_perturbed")
    assert error[999 * t < 1].max() <= RTOL


def test_load_score_sde_pytorch_returns_eval_model_with_ema_weights():
    f = fixture("ncsnpp_ve_small_perturbed")
    model = load_score_sde_pytorch(f.path, f.config)
    assert not model.training
    with torch.no_grad():
        error = per_sample_error(reference_network_output(model, f.config, f.arrays["x"], f.arrays["labels"]),
                                 f.arrays["out_ema"])
    assert error.max() <= RTOL


def test_layout_pairs_every_reference_tensor_in_checkpoint_order():
    for name in ("ddpmpp_vp_small", "ncsnpp_ve_small", "ddpm_vp_small"):
        f = fixture(name)
        saved = [k[len(PREFIX):] for k in f.state["model"] if k != PREFIX + "sigmas"]
        layout = reference_layout(f.config)
        assert [entry.ref for entry in layout] == saved
        trainable = [entry for entry in layout if entry.trainable]
        assert len(trainable) == len(f.state["ema"]["shadow_params"]) == f.meta["checkpoint"]["ema_num_shadow_params"]


def test_mismatched_config_names_the_first_mismatched_tensor():
    f = fixture("ncsnpp_ve_small")
    config, _ = config_from_score_sde(f.meta["config"])
    config.model.nf = 32
    with pytest.raises(ReferenceCheckpointError, match=r"module\.all_modules\.0\.W has shape \(24,\).*\(32,\)"):
        load_score_sde_pytorch(f.path, config)
    config, _ = config_from_score_sde(f.meta["config"])
    config.model.num_res_blocks = 1
    with pytest.raises(ReferenceCheckpointError, match=r"module\.all_modules\.6\.GroupNorm_0\.weight"):
        load_score_sde_pytorch(f.path, config)
    config, _ = config_from_score_sde(f.meta["config"])
    config.model.sigma_max = 100.0
    with pytest.raises(ReferenceCheckpointError, match=r"module\.sigmas"):
        load_score_sde_pytorch(f.path, config)
    config, _ = config_from_score_sde(f.meta["config"])
    config.model.scale_by_sigma = False  # the reference VE network would then output the score; ours σ·score
    with pytest.raises(ReferenceCheckpointError, match="scale_by_sigma"):
        load_score_sde_pytorch(f.path, config)
    config, _ = config_from_score_sde(f.meta["config"])
    config.model.attention_head_dim = 8  # the same tensors, another function: the reference attends in one head
    with pytest.raises(ReferenceCheckpointError, match="attention_head_dim=0"):
        load_score_sde_pytorch(f.path, config)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    f = fixture("ddpm_vp_small")
    state = read_reference_checkpoint(f.path)
    attention_bias = next(key for key in state["model"] if key.endswith("NIN_3.b"))
    del state["model"][attention_bias]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(ReferenceCheckpointError, match=f"{attention_bias} is missing"):
        load_score_sde_pytorch(path, f.config)

    state = read_reference_checkpoint(f.path)
    state["model"][attention_bias] = torch.zeros(7)
    torch.save(state, path)
    with pytest.raises(ReferenceCheckpointError, match=rf"{attention_bias} has shape \(7,\)"):
        load_score_sde_pytorch(path, f.config)

    state = read_reference_checkpoint(f.path)
    state["ema"]["shadow_params"].pop()
    torch.save(state, path)
    with pytest.raises(ReferenceCheckpointError, match="EMA holds 171 tensors"):
        load_score_sde_pytorch(path, f.config)


def test_reference_checkpoints_load_without_unsafe_unpickling():
    with pytest.raises(Exception, match="numpy"):  # plain weights_only=True refuses the numpy lr scalar ...
        torch.load(fixture("ddpm_vp_small").path, weights_only=True)
    assert read_reference_checkpoint(fixture("ddpm_vp_small").path)["step"] == 3  # ... our allow-list does not


def test_command_line_converter_writes_our_checkpoint(tmp_path):
    f = fixture("ncsnpp_ve_small_perturbed")
    config_file = tmp_path / "fixture_config.py"
    config_file.write_text(
        "import json\n"
        "from sde_diffusion.interop import config_from_score_sde\n\n\n"
        "def get_config():\n"
        f"    flat = json.loads(open({str(FIXTURES / (f.name + '.json'))!r}).read())['config']\n"
        "    return config_from_score_sde(flat)[0]\n")
    out = tmp_path / "converted.pth"
    result = subprocess.run([sys.executable, "-m", "sde_diffusion.interop", str(f.path), "--config", str(config_file),
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    model = create_model(f.config).eval()
    ckpt = load_model_weights(out, model, use_ema=True)
    assert ckpt["step"] == 3
    with torch.no_grad():
        error = per_sample_error(reference_network_output(model, f.config, f.arrays["x"], f.arrays["labels"]),
                                 f.arrays["out_ema"])
    assert error.max() <= RTOL


def _option_grid():
    """Every combination of the reference NCSN++ options that runs in the reference (fir=False crashes there with
    'ddpm' blocks or an output pyramid: see the grid README), with both embeddings and conditioning on and off."""
    for values in itertools.product(("ddpm", "biggan"), ("none", "output_skip", "residual"),
                                    ("none", "input_skip", "residual"), ("sum", "cat"), (False, True),
                                    ("fourier", "positional"), (False, True), (False, True), (True, False)):
        resblock, progressive, _, _, fir, *_ = values
        if not fir and (resblock == "ddpm" or progressive != "none"):
            continue
        yield values


def test_layout_fills_our_network_for_every_option_combination():
    """For every combination the layout pairs each tensor of our network with exactly one reference tensor of a
    consistent shape: the mapping is derived from the reference's construction order, not listed per case."""
    from sde_diffusion.config import default_config
    from sde_diffusion.interop.score_sde import _expected_ref_shape, convert_weights

    count = 0
    for (resblock, progressive, progressive_input, combine, fir, embedding, skip_rescale, resamp_with_conv,
         conditional) in _option_grid():
        config = default_config()
        config.data.image_size, config.data.num_channels = 8, 3
        m = config.model
        m.name, m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions = "ncsnpp", 4, (1, 2), 1, (4,)
        m.resblock_type, m.progressive, m.progressive_input, m.progressive_combine = (resblock, progressive,
                                                                                    progressive_input, combine)
        m.fir, m.embedding_type, m.skip_rescale, m.resamp_with_conv = fir, embedding, skip_rescale, resamp_with_conv
        m.conditional = conditional
        config.training.continuous = True
        ours = create_model(config).state_dict()
        layout = reference_layout(config)
        ref = {entry.ref: torch.randn(_expected_ref_shape(entry, ours)) for entry in layout}
        converted = convert_weights(ref, config, ours)  # raises if a tensor of ours is left unfilled
        assert converted.keys() == ours.keys()
        assert len({entry.ref for entry in layout}) == len(layout)
        count += 1
    assert count == 672
