"""Multi-head self-attention (model.attention_head_dim): AttnBlock against a per-head reference, one head of width C
as score_sde's single-head attention bit for bit, double backward, the DiT's head count, and the config checks."""
from __future__ import annotations

import math

import pytest
import torch

from sde_diffusion.config import ConfigError, default_config, validate_config
from sde_diffusion.models import create_model, layers
from sde_diffusion.models.layerspp import AttnBlock, ncsnpp_groups

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

WIDTH, HEAD_DIM, SIZE = 32, 8, 4  # an AttnBlock of WIDTH channels in WIDTH // HEAD_DIM heads on SIZE×SIZE positions
QKV_GAIN = 4.0  # q and k this many times unit variance: peaked attention weights, which depend on the head split


def perturbed_block(channels: int, head_dim: int, seed: int = 0, dtype=torch.float32) -> AttnBlock:
    """An AttnBlock with every parameter redrawn (proj_out starts near zero, which would hide the attention)."""
    block = AttnBlock(channels, ncsnpp_groups, head_dim=head_dim).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            scale = 0.1 if p.ndim == 1 else (QKV_GAIN if name.startswith("qkv") else 1.0) * p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * scale)
    return block


def images(channels: int = WIDTH, size: int = SIZE, batch: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def reference_attention(block: AttnBlock, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x + proj_out(concat_h softmax(q_h k_hᵀ/√d) v_h), head h holding channels h·d … h·d + d − 1 of q, k and v."""
    B, C, H, W = x.shape
    tokens = block.norm(x).flatten(2).transpose(1, 2)
    q, k, v = (t.reshape(B, H * W, C // head_dim, head_dim) for t in block.qkv(tokens).chunk(3, dim=-1))
    weights = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(head_dim), dim=-1)
    out = torch.einsum("bhnm,bmhd->bnhd", weights, v).reshape(B, H * W, C)
    return x + block.proj_out(out).transpose(1, 2).reshape(B, C, H, W)


def single_head_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """score_sde's attention, step for step: one head of width C."""
    B, C, H, W = x.shape
    tokens = block.norm(x).flatten(2).transpose(1, 2)
    q, k, v = block.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)
    h = layers.attention(q, k, v).squeeze(1)
    return x + block.proj_out(h).transpose(1, 2).unflatten(2, (H, W))


def test_multi_head_block_equals_the_per_head_reference_and_differs_from_one_head():
    block, x = perturbed_block(WIDTH, HEAD_DIM), images()
    assert block.heads == WIDTH // HEAD_DIM
    one_head = AttnBlock(WIDTH, ncsnpp_groups)
    one_head.load_state_dict(block.state_dict())
    with torch.no_grad():
        out, expected, single = block(x), reference_attention(block, x, HEAD_DIM), one_head(x)
    scale = (expected - x).abs().max()
    assert (out - expected).abs().max() <= 1e-5 * scale
    assert (out - single).abs().max() > 0.05 * scale  # the heads change the result
    for wrong in (2, 16):  # another split of the same channels is another result
        assert (out - reference_attention(block, x, wrong)).abs().max() > 0.05 * scale


def test_head_dim_equal_to_the_width_is_the_single_head_block_bit_for_bit():
    block, x = perturbed_block(WIDTH, 0), images()
    full_width = AttnBlock(WIDTH, ncsnpp_groups, head_dim=WIDTH)
    full_width.load_state_dict(block.state_dict())
    with torch.no_grad():
        expected = single_head_attention(block, x)
        assert torch.equal(block(x), expected) and torch.equal(full_width(x), expected)


def test_double_backward_through_a_multi_head_block():
    block = perturbed_block(8, 4, dtype=torch.float64)
    x = images(channels=8, size=2, batch=1, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    (grad_of_grad,) = torch.autograd.grad(grad.square().sum(), x)
    assert torch.isfinite(grad_of_grad).all() and grad_of_grad.abs().max() > 0
    assert torch.autograd.gradgradcheck(block, (x,), fast_mode=True)


def small_config(**model):
    """A 16×16 RGB VP config (ncsnpp, nf 16, widths 16 and 32, attention at 8 and in the middle: width 32)."""
    config = default_config()
    d, m = config.data, config.model
    d.dataset, d.image_size, d.num_channels = "cifar10", 16, 3
    m.name, m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout = "ncsnpp", 16, (1, 2), 1, (8,), 0.0
    for key, value in model.items():
        m[key] = value
    return config


@pytest.mark.parametrize("name, nf, head_dim", [("ncsnpp", 16, 8), ("ncsnpp", 16, 32), ("ddpm", 32, 16)])
def test_u_nets_attend_in_heads_of_the_configured_width(name, nf, head_dim):
    """Only the widths with attention must be multiples of the head width (ncsnpp with 32: level 0 is 16 wide)."""
    config = small_config(name=name, nf=nf, attention_head_dim=head_dim)
    validate_config(config)
    with torch.device("meta"):
        model = create_model(config)
    blocks = [m for m in model.modules() if isinstance(m, AttnBlock)]
    assert blocks and all(b.heads == 2 * nf // head_dim for b in blocks)


@pytest.mark.parametrize("name, nf, head_dim", [("ncsnpp", 16, 12), ("ncsnpp", 16, -4), ("ddpm", 32, 24),
                                                ("dit", 32, 12)])
def test_a_head_width_that_does_not_divide_an_attention_width_is_a_config_error(name, nf, head_dim):
    config = small_config(name=name, nf=nf, attention_head_dim=head_dim)
    if name == "dit":
        config.model.patch_size = 4
    with pytest.raises(ConfigError, match=f"model.attention_head_dim={head_dim}"):
        validate_config(config)


def test_dit_self_attention_heads_follow_attention_head_dim():
    """nf 32 with head width 8 is 4 heads (the num_heads=4 network exactly); with head width 16, 2 heads."""
    config = small_config(name="dit", nf=32, depth=1, num_heads=4, patch_size=4)
    torch.manual_seed(0)
    reference = create_model(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    x, cond = images(channels=3, size=16), torch.tensor([0.3, 700.0])
    outputs = {}
    for head_dim in (0, 8, 16):
        config.model.attention_head_dim = head_dim
        validate_config(config)
        model = create_model(config).eval()
        model.load_state_dict(reference.state_dict())
        assert model.blocks[0].attn.num_heads == (4 if head_dim in (0, 8) else 2)
        with torch.no_grad():
            outputs[head_dim] = model(x, cond)
    assert torch.equal(outputs[8], outputs[0])
    assert (outputs[16] - outputs[0]).abs().max() > 1e-3 * outputs[0].abs().max()
