"""Score networks: parameter counts of the paper's CIFAR-10 configs, FIR resampling against its definition,
every NCSN++ option building, running and mapping to the reference layout, channels_last, bf16 autocast,
torch.compile without graph breaks (EDM2's U-Net too), and the DiT."""
from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sde_diffusion import sdes
from sde_diffusion.config import ConfigError, default_config, validate_config
from sde_diffusion.interop import convert_weights, reference_layout
from sde_diffusion.models import create_model, fir, get_score_fn
from sde_diffusion.parameterization import noise_condition

REPO = Path(__file__).resolve().parents[1]

# Parameter counts of score_sde_pytorch's networks for the same settings (buffers excluded).
REFERENCE_COUNTS = {"vp_cifar": 61_804_419, "subvp_cifar": 61_804_419, "vp_cifar_deep": 106_632_579,
                    "subvp_cifar_deep": 106_632_579, "ve_cifar": 62_758_915, "ve_cifar_deep": 107_587_075,
                    "ddpm_cifar": 35_218_947}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def small_config(sde: str = "vpsde", **model):
    """A 16×16 RGB network with two resolutions (attention at 8) and the given config.model overrides."""
    config = default_config()
    config.training.sde = sde
    data = config.data
    data.dataset, data.image_size, data.num_channels, data.centered = "cifar10", 16, 3, sde != "vesde"
    m = config.model
    m.name, m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = "ncsnpp", 16, (1, 2), 1, (8,), 0.0
    if sde == "vesde":
        m.embedding_type, m.scale_by_sigma = "fourier", True
    for key, value in model.items():
        m[key] = value
    return config


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every trainable tensor so that no branch is near zero (as the fixtures' _perturbed variants)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                scale = 0.05 if p.ndim == 1 else p[0].numel() ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_cifar10_configs_have_the_reference_parameter_counts(name):
    config = load_config(name)
    validate_config(config)
    with torch.device("meta"):
        model = create_model(config)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_COUNTS[name]


# --------------------------------------------------------------------------------------------------
# FIR up/down-sampling
# --------------------------------------------------------------------------------------------------
def upfirdn2d_by_definition(x, K, up, down, pad):
    """Zero insertion, zero padding, true convolution with K, decimation: StyleGAN2's upfirdn2d_native, literally."""
    B, C, H, W = x.shape
    z = torch.zeros(B, C, H * up, W * up, dtype=x.dtype)
    z[..., ::up, ::up] = x
    z = F.pad(z, [pad[0], pad[1], pad[0], pad[1]])
    y = F.conv2d(z.reshape(B * C, 1, *z.shape[-2:]), K.flip(0, 1)[None, None].to(x.dtype))
    return y.reshape(B, C, *y.shape[-2:])[..., ::down, ::down]


@pytest.mark.parametrize("kernel", [(1, 3, 3, 1), (1, 2, 1), (1, 1), (1, 4, 6, 4, 1)])
def test_upfirdn2d_matches_its_definition(kernel):
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    K = fir.fir_filter(kernel).double()
    n = K.shape[0]
    for up, down, pad in [(2, 1, ((n - 1) // 2 + 1, (n - 2) // 2)), (1, 2, ((n - 1) // 2, (n - 2) // 2)),
                          (1, 1, (2, 2)), (2, 1, (0, 0)), (2, 1, (3, 0)), (2, 2, (1, 1))]:
        ours, ref = fir.upfirdn2d(x, K, up, down, pad), upfirdn2d_by_definition(x, K, up, down, pad)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_fir_resampling_keeps_constants_and_shapes():
    K = fir.fir_filter((1, 3, 3, 1))
    x = torch.ones(1, 2, 8, 8)
    up, down = fir.upsample_2d(x, K), fir.downsample_2d(x, K)
    assert up.shape == (1, 2, 16, 16) and down.shape == (1, 2, 4, 4)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.ones_like(up[..., 2:-2, 2:-2]))
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.ones_like(down[..., 1:-1, 1:-1]))


def test_fused_upsample_conv_is_upsample_then_conv_away_from_the_border():
    """StyleGAN2's fused op (transposed conv, then FIR) = FIR upsampling then a 'same' conv, up to border effects
    (the fused op pads once, at the end). The reference PyTorch port crashes here; the JAX original computes this."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=gen)
    K = fir.fir_filter((1, 3, 3, 1)).double()
    fused = fir.upsample_conv_2d(x, w, K)
    separate = F.conv2d(fir.upsample_2d(x, K), w, padding=1)
    assert fused.shape == separate.shape == (2, 5, 16, 16)
    torch.testing.assert_close(fused[..., 3:-3, 3:-3], separate[..., 3:-3, 3:-3], rtol=0, atol=1e-12)
    down = fir.conv_downsample_2d(x, w, K)
    assert down.shape == (2, 5, 4, 4)
    separate = fir.downsample_2d(F.conv2d(x, w, padding=1), K)  # "conv, then downsample", fused
    torch.testing.assert_close(down[..., 1:-1, 1:-1], separate[..., 1:-1, 1:-1], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# NCSN++ options
# --------------------------------------------------------------------------------------------------
def reference_state_from(model: torch.nn.Module, config):
    """Our weights written in the reference layout (the inverse of convert_weights)."""
    ours = model.state_dict()
    ref = {}
    for entry in reference_layout(config):
        if entry.ours is None:
            ref[entry.ref] = torch.zeros(entry.shape)
            continue
        value = ours[entry.ours]
        if entry.rows is not None:
            value = value[entry.rows[0]:entry.rows[1]]
        if entry.nin:
            value = value.reshape(value.shape[0], value.shape[1]).t()
        ref[entry.ref] = value.clone()
    return ref


OPTION_GRID = list(itertools.product(["biggan", "ddpm"], [False, True], ["none", "output_skip", "residual"],
                                     ["none", "input_skip", "residual"]))


@pytest.mark.parametrize("resblock_type,fir_on,progressive,progressive_input", OPTION_GRID)
def test_every_ncsnpp_option_builds_runs_and_maps_onto_the_reference_layout(resblock_type, fir_on, progressive,
                                                                             progressive_input):
    combine = "cat" if (fir_on, progressive) in {(False, "none"), (True, "residual"), (False, "output_skip")} else "sum"
    sde = "vesde" if fir_on else "vpsde"
    config = small_config(sde, resblock_type=resblock_type, fir=fir_on, progressive=progressive,
                          progressive_input=progressive_input, progressive_combine=combine, init_scale=1.0,
                          resamp_with_conv=progressive != "output_skip", conditional=progressive != "residual",
                          skip_rescale=resblock_type == "biggan")
    validate_config(config)
    torch.manual_seed(0)
    model = perturb_(create_model(config)).eval()
    x = torch.rand(2, 3, 16, 16)
    cond = sdes.VESDE().sigma(torch.tensor([0.3, 0.7])) if sde == "vesde" else torch.tensor([100.0, 700.0])
    with torch.no_grad():
        out = model(x, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()

    # Round trip through the reference layout: every tensor of ours has exactly one reference counterpart.
    ref = reference_state_from(model, config)
    unused = sum(entry.shape is not None and torch.Size(entry.shape).numel() for entry in reference_layout(config))
    assert sum(v.numel() for v in ref.values()) - unused == sum(v.numel() for v in model.state_dict().values())
    fresh = create_model(config).eval()
    fresh.load_state_dict(convert_weights(ref, config, fresh.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, cond), out, rtol=0, atol=0)


def test_unknown_option_values_are_config_errors_naming_the_key():
    for key, value in [("resblock_type", "resnet"), ("progressive", "skip"), ("progressive_input", "sum"),
                       ("progressive_combine", "max"), ("embedding_type", "learned"), ("conv_size", 5)]:
        config = small_config(**{key: value})
        with pytest.raises(ConfigError, match=f"model.{key}"):
            validate_config(config)
    with pytest.raises(ConfigError, match="scale_by_sigma"):
        validate_config(small_config("vpsde", scale_by_sigma=True))
    with pytest.raises(ConfigError, match="GroupNorm|groups"):
        validate_config(small_config(nf=18))  # 18 channels cannot be split in min(18 // 4, 32) = 4 groups
    with pytest.raises(AttributeError):
        small_config().model.fir_kernell = (1, 1)  # the config is locked: typos fail


def test_ddpm_unet_is_the_ncsnpp_unet_with_ddpm_choices():
    config = small_config(nf=32)
    config.model.name = "ddpm"
    model = create_model(config)
    assert model.options.resblock_type == "ddpm" and not model.options.skip_rescale
    assert all(norm.num_groups == 32 for norm in model.modules() if isinstance(norm, torch.nn.GroupNorm))
    config.model.nf = 16
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model(config)


def test_scale_by_sigma_output_is_the_ve_score():
    config = small_config("vesde", init_scale=1.0)
    model = perturb_(create_model(config)).eval()
    sde, x, t = sdes.VESDE(), torch.rand(2, 3, 16, 16), torch.tensor([0.2, 0.9])
    unscaled = create_model(small_config("vesde", init_scale=1.0, scale_by_sigma=False)).eval()
    unscaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        score = get_score_fn(sde, model)(x, t)
        # the network outputs σ·score; the 'score' parameterization divides by σ(t) once
        torch.testing.assert_close(score, model(x, sde.sigma(t)) / sde.sigma(t)[:, None, None, None])
        torch.testing.assert_close(score, get_score_fn(sde, unscaled)(x, t))  # = output / σ of the unscaled net


# --------------------------------------------------------------------------------------------------
# Speed features
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", ["vpsde", "vesde"])
def test_channels_last_input_gives_the_same_output(sde):
    config = small_config(sde, fir=sde == "vesde", progressive_input="residual" if sde == "vesde" else "none",
                          progressive="output_skip" if sde == "vesde" else "none", init_scale=1.0)
    torch.manual_seed(0)
    model = perturb_(create_model(config)).eval()
    x = torch.rand(2, 3, 16, 16)
    cond = torch.tensor([0.5, 20.0]) if sde == "vesde" else torch.tensor([100.0, 700.0])
    with torch.no_grad():
        reference = model(x, cond)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last), cond)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("sde_name", ["vpsde", "vesde"])
def test_bf16_autocast_score_is_within_1e_2_of_fp32(sde_name):
    """With the paper configs' initialisation (init_scale=0), bf16 autocast changes the score by < 1e-2 relative.
    (bf16 keeps 8 mantissa bits: every conv output is rounded by up to 0.4%, so deep networks with large
    residual branches drift further: about 2% on the fixtures' _perturbed weights.)"""
    sde = sdes.VESDE() if sde_name == "vesde" else sdes.VPSDE()
    config = small_config(sde_name, fir=sde_name == "vesde",
                          progressive_input="residual" if sde_name == "vesde" else "none")
    torch.manual_seed(0)
    model = create_model(config).eval()
    score_fn = get_score_fn(sde, model)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0.9, 0.5, 0.1, 1e-3])
    with torch.no_grad():
        fp32 = score_fn(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = score_fn(x, t)
    assert torch.isfinite(bf16).all()
    error = (bf16.float() - fp32).abs().flatten(1).amax(1) / fp32.abs().flatten(1).amax(1)
    assert error.max() <= 1e-2, error.tolist()


def test_forward_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) needs one graph: checked with dynamo on an NCSN++ using FIR, both pyramids,
    Fourier embedding and σ scaling, a DDPM U-Net, a DiT and a one-level EDM2 U-Net (backend 'eager': no code
    generation)."""
    ncsnpp = small_config("vesde", fir=True, progressive="output_skip", progressive_input="residual", nf=8,
                          attn_resolutions=(8,), ch_mult=(1, 1))
    ddpm = small_config(nf=32, ch_mult=(1, 1), name="ddpm")
    dit = small_config(name="dit", nf=32, depth=2, num_heads=2, patch_size=4)
    edm2 = small_config(name="edm2", nf=8, ch_mult=(1,), num_res_blocks=0, attn_resolutions=())
    for config in (ncsnpp, ddpm, dit, edm2):
        model = create_model(config).eval()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        x = torch.rand(2, 3, 16, 16)
        cond = torch.tensor([0.5, 20.0]) if config.model.scale_by_sigma else torch.tensor([100.0, 700.0])
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, cond), model(x, cond))
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sde_name", ["vpsde", "subvpsde", "vesde"])
def test_dit_works_with_every_sde(sde_name):
    config = small_config(sde_name, name="dit", nf=32, depth=2, num_heads=4, patch_size=2, scale_by_sigma=False)
    validate_config(config)
    model = create_model(config)
    sde = {"vpsde": sdes.VPSDE, "subvpsde": sdes.SubVPSDE, "vesde": sdes.VESDE}[sde_name]()
    x, t = torch.rand(3, 3, 16, 16), torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        assert torch.count_nonzero(model(x, noise_condition(sde, t))) == 0  # adaLN-zero: the output starts at 0
    perturb_(model)
    score = get_score_fn(sde, model)(x, t)
    assert score.shape == x.shape and torch.isfinite(score).all()
    score.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_dit_patchify_then_unpatchify_is_the_identity():
    model = create_model(small_config(name="dit", nf=32, depth=1, num_heads=2, patch_size=4))
    x = torch.randn(2, 3, 16, 16)
    p, C = 4, 3
    patches = x.reshape(2, C, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * C)  # row-major patches
    torch.testing.assert_close(model.unpatchify(patches, 16, 16), x, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="patch_size"):
        validate_config(small_config(name="dit", nf=32, num_heads=2, patch_size=3))
    with pytest.raises(ConfigError, match="num_heads"):
        validate_config(small_config(name="dit", nf=32, num_heads=3, patch_size=2))
