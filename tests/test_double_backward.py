"""Second-order gradients through every registered network, as gradient penalties, sliced score matching and
divergence-in-the-loss objectives take them: train mode on CPU (dropout active), NCHW and channels_last, a
256-channel case, and float64 checks of the second derivatives against finite differences.

The networks are stock torch layers; on CPU their attention is written out with matmul and softmax
(`layers.attention`), so no context manager is needed."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from sde_diffusion.config import default_config, validate_config
from sde_diffusion.models import MODELS, create_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

BATCH = 2

# config.model overrides per case; every registered network has at least one
CASES = {
    "ddpm": dict(name="ddpm", nf=32),
    "ncsnpp": dict(name="ncsnpp"),  # DDPM++: BigGAN blocks, no FIR
    "ncsnpp-fir-progressive": dict(name="ncsnpp", fir=True, progressive="output_skip", progressive_input="residual",
                                   embedding_type="fourier"),
    "ncsnpp-ddpm-blocks-residual": dict(name="ncsnpp", resblock_type="ddpm", progressive="residual",
                                        progressive_input="input_skip", progressive_combine="cat"),
    "ncsnpp-256-channels": dict(name="ncsnpp", nf=128, attn_resolutions=()),  # 256 channels at 4×4
    "dit": dict(name="dit", nf=32, depth=2, num_heads=2, patch_size=2),
    # magnitude-preserving U-Net: forced weight normalization in train mode; EDM's noise input
    "edm2": dict(name="edm2", noise_conditioning="log_sigma"),
    "mlp": dict(name="mlp", nf=32, num_res_blocks=2),
}
CONV_NETS = ("ddpm", "edm2", "ncsnpp")


def network_config(name: str, dropout: float = 0.1, **model):
    """A tiny network: 8×8 RGB images with two resolutions (attention at 4×4), or 2-D vectors for the MLP."""
    config = default_config()
    d, m = config.data, config.model
    if name == "mlp":
        d.dataset = "gmm"
    else:
        d.dataset, d.image_size, d.num_channels = "cifar10", 8, 3
    m.name, m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = name, 16, (1, 2), 1, (4,), dropout
    for key, value in model.items():
        m[key] = value
    validate_config(config)
    return config


def randomized_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every trainable tensor, so that no branch starts at zero (zero-initialized output layers, adaLN-zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                scale = 0.05 if p.ndim <= 1 else p[0].numel() ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model


def inputs(config, dtype=torch.float32, channels_last: bool = False):
    """(x, noise condition) for a batch of BATCH; the condition is positive (a Fourier embedding takes its log)."""
    gen = torch.Generator().manual_seed(1)
    d = config.data
    shape = (BATCH, d.dim) if config.model.name == "mlp" else (BATCH, d.num_channels, d.image_size, d.image_size)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.tensor([3.0, 700.0], dtype=dtype)


def network_loss(model: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Σ model(x)², plus Σ log_variance(cond)² for a network with a learned uncertainty (EDM2), which its loss uses."""
    loss = model(x, cond).pow(2).sum()
    if hasattr(model, "log_variance"):
        loss = loss + model.log_variance(cond).pow(2).sum()
    return loss


def gradient_penalty_grads(model: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor):
    """∂P/∂(x, θ) of P = Σ ‖∂L/∂v‖² over v ∈ (x, θ), L = `network_loss`: a double backward through the network."""
    weights = [p for p in model.parameters() if p.requires_grad]
    x = x.detach().requires_grad_(True)
    first = torch.autograd.grad(network_loss(model, x, cond), [x] + weights, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    return torch.autograd.grad(penalty, [x] + weights)


def test_every_registered_network_has_a_case():
    assert set(MODELS) <= {case["name"] for case in CASES.values()}


# every case in NCHW; the convolutional ones also in channels_last
LAYOUTS = [(case, False) for case in sorted(CASES)] + [(case, True) for case in sorted(CASES)
                                                       if CASES[case]["name"] in CONV_NETS]


@pytest.mark.parametrize("case, channels_last", LAYOUTS,
                         ids=[f"{case}-{'channels_last' if last else 'nchw'}" for case, last in LAYOUTS])
def test_double_backward_in_train_mode(case, channels_last):
    config = network_config(**CASES[case])
    torch.manual_seed(0)
    model = randomized_(create_model(config)).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, cond = inputs(config, channels_last=channels_last)
    names = ["x"] + [n for n, p in model.named_parameters() if p.requires_grad]
    for label, grad in zip(names, gradient_penalty_grads(model, x, cond)):
        assert torch.isfinite(grad).all(), f"{label}: non-finite second-order gradient"
        assert grad.abs().max() > 0, f"{label}: second-order gradient is zero"


def test_dropout_is_active_in_train_mode():
    """The train-mode cases run with dropout: two forward passes differ, and eval mode is deterministic."""
    config = network_config(**CASES["ncsnpp"])
    model = randomized_(create_model(config)).train()
    x, cond = inputs(config)
    with torch.no_grad():
        assert not torch.equal(model(x, cond), model(x, cond))
        model.eval()
        assert torch.equal(model(x, cond), model(x, cond))


GRADGRADCHECK_TENSORS = 5  # x and about this many weight matrices, spread over the network (each costs evaluations)


@pytest.mark.parametrize("case", ["ncsnpp-fir-progressive", "dit"])
def test_second_derivatives_match_finite_differences(case):
    """float64, eval mode: the Jacobian of the input and weight gradients (vector-Jacobian products of the output)
    against central differences of them, along random directions (gradgradcheck's fast mode), for x and weight
    matrices from the input to the output layer."""
    config = network_config(**dict(CASES[case], nf=8, embedding_type="fourier"), dropout=0.0)
    torch.manual_seed(0)
    model = randomized_(create_model(config).double()).eval()
    x, cond = inputs(config, dtype=torch.float64)
    matrices = [n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]  # conv/linear weights
    names = list(dict.fromkeys(matrices[::len(matrices) // GRADGRADCHECK_TENSORS] + matrices[-1:]))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def network(x, *weights):
        return functional_call(model, {**params, **dict(zip(names, weights))}, (x, cond))

    weights = [params[n].clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradgradcheck(network, [x.requires_grad_(True)] + weights, fast_mode=True)
