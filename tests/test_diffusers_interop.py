"""diffusers-format models both ways: tiny random UNet2DModels in the block layouts of the released models (DDPM
CIFAR-10, DDPM 256×256, score_sde's NCSN++ VE), with one attention head per layer or heads of attention_head_dim
channels, saved with save_pretrained in a temporary folder, loaded by us with the same function; ours → diffusers →
ours exactly; our samplers on a loaded DDPM model follow diffusers' DDIM and DDPM schedulers from the same noise.
Nothing touches the network."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers (a test-time dependency) is not installed")

from sde_diffusion import sampling, sdes  # noqa: E402
from sde_diffusion.checkpoints import load_model_weights  # noqa: E402
from sde_diffusion.config import load_config_file  # noqa: E402
from sde_diffusion.interop import (DiffusersFormatError, config_from_diffusers, load_diffusers,  # noqa: E402
                                   save_diffusers)
from sde_diffusion.models import create_model, get_score_fn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5  # per sample: max |ours − theirs| ≤ RTOL · max |theirs|

pytestmark = pytest.mark.usefixtures("one_thread")

# The released models' block layouts (google/ddpm-cifar10-32, google/ddpm-*-256, google/ncsnpp-*-256) at tiny widths.
LAYOUTS = {
    "ddpm_cifar10": dict(
        sample_size=16, block_out_channels=(32, 64, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
        mid_block_scale_factor=1, center_input_sample=False),
    "ddpm_256": dict(
        sample_size=32, block_out_channels=(32, 32, 64, 64, 96, 96), layers_per_block=2,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
        mid_block_scale_factor=1, center_input_sample=False),
    "ncsnpp_ve": dict(
        sample_size=32, block_out_channels=(16, 16, 32, 128, 128), layers_per_block=2,
        down_block_types=("SkipDownBlock2D",) * 3 + ("AttnSkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D") + ("SkipUpBlock2D",) * 3,
        attention_head_dim=None, norm_eps=1e-6, time_embedding_type="fourier", mid_block_scale_factor=math.sqrt(2.0),
        norm_num_groups=None, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, center_input_sample=False),
}
DDPM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      clip_sample=False, variance_type="fixed_large")
VE_SCHEDULER = dict(num_train_timesteps=2000, sigma_min=0.01, sigma_max=348.0, snr=0.075)


def per_sample_error(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    return (ours - theirs).abs().flatten(1).amax(1) / theirs.abs().flatten(1).amax(1)


def random_unet(layout: str, seed: int = 0, attention_head_dim: Optional[int] = None):
    """A UNet2DModel of the layout with every parameter perturbed (zero-initialized layers would hide mistakes), its
    attention in heads of attention_head_dim channels (None: one head per layer)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**{**LAYOUTS[layout], "attention_head_dim": attention_head_dim})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return unet.eval()


def save_pipeline(unet, folder: Path, layout: str, **scheduler) -> Path:
    if layout.startswith("ddpm"):
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**DDPM_SCHEDULER, **scheduler))
    else:
        pipe = diffusers.ScoreSdeVePipeline(unet=unet, scheduler=diffusers.ScoreSdeVeScheduler(**VE_SCHEDULER))
    pipe.save_pretrained(folder)
    return folder


def inputs(layout: str, batch: int = 3):
    """x and the unet's time input: DDPM step indices, or NCSN++'s σ (which diffusers divides the output by)."""
    size = LAYOUTS[layout]["sample_size"]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0, 317, 999]) if layout.startswith("ddpm") else torch.tensor([0.012, 1.7, 300.0])
    return x, t


def ours_as_diffusers(model, config, x, t):
    """Our network's output in diffusers' terms: the NCSN++ VE unet divides by σ inside (our 'score'
    parameterization does it outside)."""
    out = model(x, t.float())
    return out / t[:, None, None, None] if config.model.scale_by_sigma else out


@pytest.mark.parametrize("layout, head_dim", [(layout, None) for layout in sorted(LAYOUTS)]
                         + [("ddpm_cifar10", 8), ("ddpm_cifar10", 16)])  # 8: diffusers' training example
def test_loaded_network_equals_diffusers_forward(layout, head_dim, tmp_path):
    unet = random_unet(layout, attention_head_dim=head_dim)
    model, config = load_diffusers(save_pipeline(unet, tmp_path / "pipe", layout))
    assert config.model.attention_head_dim == (head_dim or 0)
    x, t = inputs(layout)
    with torch.no_grad():
        error = per_sample_error(ours_as_diffusers(model, config, x, t), unet(x, t).sample)
    assert error.max() <= RTOL, f"{layout}: per-sample relative errors {error.tolist()}"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in unet.parameters())
    sde = sdes.sde_from_config(config)
    if layout.startswith("ddpm"):
        assert config.model.name == "ddpm" and config.model.up_attn_per_block and not config.training.continuous
        assert isinstance(sde, sdes.VPSDE) and sde.N == 1000
        assert (sde.beta_min, sde.beta_max) == pytest.approx((0.1, 20.0))
    else:
        assert config.model.name == "ncsnpp" and config.training.continuous and config.model.scale_by_sigma
        assert isinstance(sde, sdes.VESDE) and (sde.sigma_min, sde.sigma_max, sde.N) == (0.01, 348.0, 2000)
        # the score: diffusers' output is the score itself at σ(t)
        tt = torch.tensor([0.3, 0.8, 0.95])
        sigma = sde.sigma(tt)
        with torch.no_grad():
            score = get_score_fn(sde, model, continuous=True)(x, tt)
            error = per_sample_error(score, unet(x, sigma).sample)
        assert error.max() <= RTOL


def test_ddpm_family_loads_a_bare_unet_folder_with_the_ddpm_defaults(tmp_path):
    unet = random_unet("ddpm_cifar10", seed=3)
    unet.save_pretrained(tmp_path / "unet_only")
    model, config = load_diffusers(tmp_path / "unet_only")
    assert config.model.beta_schedule == "linear_chain" and config.model.num_scales == 1000
    assert (config.model.beta_min, config.model.beta_max) == pytest.approx((0.1, 20.0))
    x, t = inputs("ddpm_cifar10")
    with torch.no_grad():
        assert per_sample_error(model(x, t.float()), unet(x, t).sample).max() <= RTOL


@pytest.mark.parametrize("layout, head_dim", [("ddpm_cifar10", None), ("ddpm_cifar10", 8), ("ncsnpp_ve", 8)])
def test_round_trip_ours_to_diffusers_to_ours_is_exact(layout, head_dim, tmp_path):
    original = random_unet(layout, seed=7, attention_head_dim=head_dim)
    model, config = load_diffusers(save_pipeline(original, tmp_path / "first", layout))
    save_diffusers(model, config, tmp_path / "exported")
    written = json.loads((tmp_path / "exported" / "unet" / "config.json").read_text())
    assert written["attention_head_dim"] == head_dim
    again, config_again = load_diffusers(tmp_path / "exported")
    assert config_again.to_dict() == config.to_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    # and diffusers loads what we wrote, unet and pipeline, with our network's output
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "exported" / "unet").eval()
    pipeline_class = diffusers.DDPMPipeline if layout.startswith("ddpm") else diffusers.ScoreSdeVePipeline
    assert isinstance(pipeline_class.from_pretrained(tmp_path / "exported").unet, diffusers.UNet2DModel)
    x, t = inputs(layout)
    with torch.no_grad():
        ours = ours_as_diffusers(model, config, x, t)
        assert per_sample_error(ours, unet(x, t).sample).max() <= RTOL
        assert per_sample_error(ours, original(x, t).sample).max() <= RTOL


def test_a_network_we_trained_exports(tmp_path):
    """Our own ddpm config (Ho et al.'s layout, continuous VP at N = 1000) → a DDPMPipeline folder."""
    config = load_config_file(str(REPO / "configs" / "ddpm_cifar.py"))
    config.data.image_size, config.model.nf, config.model.ch_mult = 16, 32, (1, 2)
    config.model.num_res_blocks, config.model.attn_resolutions, config.model.up_attn_per_block = 1, (8,), True
    model = create_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    save_diffusers(model, config, tmp_path / "ours")
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "ours" / "unet").eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 640])
    with torch.no_grad():
        assert per_sample_error(model(x, t.float()), unet(x, t).sample).max() <= RTOL
    scheduler = json.loads((tmp_path / "ours" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_start"] == pytest.approx(1e-4) and scheduler["beta_end"] == pytest.approx(0.02)


def test_what_does_not_map_is_named(tmp_path):
    base = {"_class_name": "UNet2DModel", **LAYOUTS["ddpm_cifar10"]}
    for key, value, match in (("downsample_padding", 1, "downsample_padding=1"),
                              ("attention_head_dim", 48, r"attention_head_dim=48: .* block_out_channels\[1\]=64"),
                              ("attention_head_dim", 0, "attention_head_dim=0"),
                              ("up_block_types", ("UpBlock2D",) * 4, r"up_block_types\[2\]"),
                              ("class_embed_type", "timestep", "class_embed_type"),
                              ("block_out_channels", (32, 48, 64, 64), "multiples of the first"),
                              ("resnet_groups_typo", 3, "resnet_groups_typo")):
        with pytest.raises(DiffusersFormatError, match=match):
            config_from_diffusers({**base, key: value})
    with pytest.raises(DiffusersFormatError, match="beta_schedule='squaredcos_cap_v2'"):
        config_from_diffusers(base, {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2"})
    ncsn = {"_class_name": "UNet2DModel", **LAYOUTS["ncsnpp_ve"], "block_out_channels": (16, 16, 32, 64, 64)}
    with pytest.raises(DiffusersFormatError, match="at least 128"):
        config_from_diffusers(ncsn)
    # a tensor the config does not explain, and a missing one, are named
    unet = random_unet("ddpm_cifar10")
    folder = tmp_path / "bad"
    unet.save_pretrained(folder)
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    tensors["down_blocks.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DiffusersFormatError, match=r"down_blocks\.0\.extra\.weight \(2,\) has no place"):
        load_diffusers(folder)
    del tensors["down_blocks.0.extra.weight"], tensors["mid_block.attentions.0.to_k.bias"]
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DiffusersFormatError, match=r"mid_block\.attentions\.0\.to_k\.bias is missing"):
        load_diffusers(folder)
    with pytest.raises(DiffusersFormatError, match="not a folder"):
        load_diffusers(tmp_path / "absent")


def _loaded_ddpm(tmp_path):
    unet = random_unet("ddpm_cifar10", seed=11)
    model, config = load_diffusers(save_pipeline(unet, tmp_path / "pipe", "ddpm_cifar10"))
    sde = sdes.sde_from_config(config)
    return unet, model, sde, get_score_fn(sde, model, continuous=config.training.continuous)


def test_ddim_eta_0_matches_diffusers_ddim_scheduler(tmp_path):
    unet, model, sde, score_fn = _loaded_ddpm(tmp_path)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    scheduler = diffusers.DDIMScheduler(**{k: v for k, v in DDPM_SCHEDULER.items() if k != "variance_type"})
    scheduler.set_timesteps(50)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    grid = scheduler.timesteps.double() / (sde.N - 1)  # 980/999 … 0: the same levels, then our denoising step
    ours, nfe = sampling.sample(score_fn, sde, x_T.shape, "ddim", grid=grid, x_T=x_T)
    assert nfe == 50
    error = per_sample_error(ours, x)
    assert error.max() <= 1e-4, error.tolist()


def test_ancestral_sampler_matches_diffusers_ddpm_scheduler(tmp_path):
    """Algorithm 2 step for step: σ_t² = β_t (fixed_large), no clipping, the same noise draws."""
    unet, model, sde, score_fn = _loaded_ddpm(tmp_path)
    steps = 60  # the first (noisiest) levels 999 … 940, then a jump-free comparison of the state
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    scheduler = diffusers.DDPMScheduler(**DDPM_SCHEDULER)
    scheduler.set_timesteps(1000)
    g = torch.Generator().manual_seed(21)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps[:steps]:
            x = scheduler.step(unet(x, t).sample, t, x, generator=g).prev_sample
    grid = torch.arange(999, 999 - steps - 1, -1, dtype=torch.float64) / 999
    ours, _ = sampling.sample(score_fn, sde, x_T.shape, "ancestral", grid=grid, x_T=x_T, denoise=False,
                              noise_last=True, generator=torch.Generator().manual_seed(21))
    error = per_sample_error(ours, x)
    assert error.max() <= 1e-4, error.tolist()


# diffusers' multistep solvers take their lower-order last step to σ = 0, which is our final denoising step: our last
# grid interval keeps the full order
SOLVERS = {"DDIMScheduler": ("ddim", {}),
           "DPMSolverMultistepScheduler": ("dpm_solver", dict(order=2, lower_order_final=False)),
           "UniPCMultistepScheduler": ("unipc", dict(order=2, lower_order_final=False))}


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_other_prediction_types_load_and_follow_diffusers_solvers(prediction, tmp_path):
    """A DDPM unet saved with prediction_type v_prediction (or sample) loads as our 'v' ('x0') parameterization, and
    our DDIM, DPM-Solver++(2M) and UniPC (bh2, order 2) on the scheduler's 10 levels follow diffusers' schedulers
    run with that prediction_type from the same noise (their last step to σ = 0 is our final denoising step).
    Loaded as ε-prediction instead, the same network lands far away."""
    unet = random_unet("ddpm_cifar10", seed=13)
    model, config = load_diffusers(save_pipeline(unet, tmp_path / "pipe", "ddpm_cifar10", prediction_type=prediction))
    assert config.model.parameterization == {"v_prediction": "v", "sample": "x0"}[prediction]
    sde = sdes.sde_from_config(config)
    score_fn = get_score_fn(sde, model, continuous=False, parameterization=config.model.parameterization)
    as_eps = get_score_fn(sde, model, continuous=False, parameterization="eps")
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    base = {k: v for k, v in DDPM_SCHEDULER.items() if k not in ("variance_type", "clip_sample")}
    for name, (method, options) in SOLVERS.items():
        scheduler = getattr(diffusers, name)(**base, prediction_type=prediction,
                                             **({"clip_sample": False} if name == "DDIMScheduler" else {}))
        scheduler.set_timesteps(10)
        x = x_T.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        grid = scheduler.timesteps.double() / (sde.N - 1)
        ours, nfe = sampling.sample(score_fn, sde, x_T.shape, method, grid=grid, x_T=x_T, **options)
        assert nfe == 10 and per_sample_error(ours, x).max() <= 1e-4, (name, per_sample_error(ours, x).tolist())
        wrong, _ = sampling.sample(as_eps, sde, x_T.shape, method, grid=grid, x_T=x_T, **options)
        assert per_sample_error(wrong, x).min() > 100 * 1e-4, name
    save_diffusers(model, config, tmp_path / "back")
    written = json.loads((tmp_path / "back" / "scheduler" / "scheduler_config.json").read_text())
    assert written["prediction_type"] == prediction


def test_command_line_converts_a_diffusers_folder_for_main(tmp_path):
    folder = save_pipeline(random_unet("ddpm_cifar10", seed=2), tmp_path / "pipe", "ddpm_cifar10")
    out, config_out = tmp_path / "run" / "checkpoints" / "checkpoint_1.pth", tmp_path / "run" / "config.py"
    result = subprocess.run([sys.executable, "-m", "sde_diffusion.interop", str(folder), "--out", str(out),
                             "--config_out", str(config_out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    config = load_config_file(str(config_out))
    model, expected = load_diffusers(folder)
    assert config.to_dict() == expected.to_dict()
    converted = create_model(config)
    load_model_weights(out, converted, use_ema=True)
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
