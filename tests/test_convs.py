"""models/convs.py: Conv3x3 computes exactly nn.Conv2d's function and gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sde_diffusion.models.convs import (GEMM_MAX_POSITIONS, GEMM_MIN_CHANNELS, GEMM_MIN_CHANNELS_SMALL_BATCH,
                                       SMALL_BATCH, Conv3x3, weight_grad_3x3)


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 3, 4, 9), (3, 16, 8, 8), (2, 4, 1, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_grad_3x3_equals_autograd(shape, channels_last):
    B, c_in, H, W = shape
    c_out = 6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(B, c_out, H, W, generator=g, dtype=torch.float64)
    if channels_last:
        x, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    (F.conv2d(x, w, padding=1) * grad_out).sum().backward()
    ours = weight_grad_3x3(grad_out, x)
    assert ours.shape == w.shape
    torch.testing.assert_close(ours, w.grad, rtol=1e-12, atol=1e-12)


def _grads(layer, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (y * grad_out).sum().backward()
    return y, x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv3x3_matches_nn_conv2d(channels_last):
    torch.manual_seed(0)
    c = GEMM_MIN_CHANNELS
    ours = Conv3x3(c, c).double()
    stock = nn.Conv2d(c, c, 3, padding=1).double()
    stock.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, c, 6, 4, dtype=torch.float64)
    grad_out = torch.randn(3, c, 6, 4, dtype=torch.float64)
    if channels_last:
        ours, stock = ours.to(memory_format=torch.channels_last), stock.to(memory_format=torch.channels_last)
        x, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    for a, b in zip(_grads(ours, x, grad_out), _grads(stock, x, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _kernel(layer, x):
    name = type(layer(x).grad_fn).__name__
    return "gemm" if name == "_Conv3x3GemmWeightGradBackward" else "stock" if "Convolution" in name else name


def test_conv3x3_uses_gemm_weight_grad_only_where_it_applies():
    c = GEMM_MIN_CHANNELS
    layer = Conv3x3(c, c)
    x = torch.randn(2, c, 5, 5).contiguous(memory_format=torch.channels_last)
    assert _kernel(layer, x) == "gemm"
    with torch.no_grad():
        assert layer(x).grad_fn is None
    assert _kernel(layer.eval(), x.requires_grad_(True)) == "stock"     # eval: e.g. the likelihood's ∇ₓ
    layer.train().requires_grad_(False)
    assert _kernel(layer, x) == "stock"                                # no weight gradient wanted
    layer.requires_grad_(True)
    assert _kernel(layer, x.contiguous()) == "stock"                   # NCHW
    narrow = GEMM_MIN_CHANNELS_SMALL_BATCH
    assert _kernel(Conv3x3(c, narrow), x) == "gemm"                    # narrower, at a small batch ...
    wide_batch = torch.randn(SMALL_BATCH + 1, c, 5, 5).contiguous(memory_format=torch.channels_last)
    assert _kernel(Conv3x3(c, narrow), wide_batch) == "stock"          # ... but not at a larger one
    assert _kernel(Conv3x3(c, c), wide_batch) == "gemm"
    assert _kernel(Conv3x3(c, narrow // 2), x) == "stock"              # too few channels
    side = int((GEMM_MAX_POSITIONS // 2) ** 0.5) + 1
    big = torch.randn(2, c, side, side).contiguous(memory_format=torch.channels_last)
    assert _kernel(layer, big) == "stock"                              # too many positions
    layer.gemm_weight_grad = False
    assert _kernel(layer, x) == "stock"


def test_input_without_gradient():
    """An input that needs no gradient (as a network's first layer): only weight and bias gradients, and right."""
    torch.manual_seed(1)
    c = GEMM_MIN_CHANNELS
    ours, stock = Conv3x3(c, c), nn.Conv2d(c, c, 3, padding=1)
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(2, c, 4, 4).contiguous(memory_format=torch.channels_last)
    assert _kernel(ours, x) == "gemm"
    for layer in (ours, stock):
        layer(x).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, stock.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, stock.bias.grad, rtol=1e-5, atol=1e-5)


def test_reused_tap_buffer_leaves_nothing_behind():
    """Under no_grad (as in backward) the tap layout is a reused buffer: a call after a larger one, with other
    shapes and a dtype change, must still see zero padding and only its own input."""
    g = torch.Generator().manual_seed(1)
    for B, c_in, H, W, dtype in [(3, 8, 9, 7, torch.float64), (2, 5, 4, 3, torch.float64), (1, 3, 6, 2, torch.float64),
                                 (2, 4, 5, 5, torch.float32), (3, 8, 9, 7, torch.float64)]:
        x = torch.randn(B, c_in, H, W, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
        grad_out = torch.randn(B, 4, H, W, generator=g, dtype=dtype)
        w = torch.zeros(4, c_in, 3, 3, dtype=dtype, requires_grad=True)
        (F.conv2d(x, w, padding=1) * grad_out).sum().backward()
        with torch.no_grad():
            ours = weight_grad_3x3(grad_out, x)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(ours, w.grad, rtol=tol, atol=tol)
