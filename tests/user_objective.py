"""An SDE and an objective as a user writes them in their own file: nothing of the package is edited, and a config
that imports this module (tests/user_objective_config.py) trains, evaluates and samples with them from main.py."""
import torch

from sde_diffusion import losses, sdes


@sdes.register_sde("user_cubic_vp")
class CubicVP(sdes.SDE):
    """VP with β(t) = 0.1 + 3·scale·t², i.e. ∫β = 0.1t + scale·t³: α = exp(−½∫β), σ = √(1 − α²)."""

    def __init__(self, scale: float = 10.0, N: int = 1000):
        super().__init__(N)
        self.scale = scale

    def alpha(self, t):
        t = sdes.as_time(t)
        return torch.exp(-0.5 * (0.1 * t + self.scale * t**3))

    def sigma(self, t):
        t = sdes.as_time(t)
        return torch.sqrt(-torch.expm1(-(0.1 * t + self.scale * t**3)))


@losses.register_weighting("user_truncated_snr")
def truncated_snr(log_snr, *, floor: float = 1.0):
    """max(SNR, floor) on the x₀-error (Salimans & Ho's truncated SNR), i.e. max(SNR, floor)/SNR on ε."""
    snr = torch.exp(2 * log_snr)
    return torch.clamp(snr, min=floor) / snr


@losses.register_time_sampling("user_power")
def power_times(sde, n, *, generator=None, eps=1e-5, device=None, power: float = 2.0):
    """t = eps + (T − eps)·u^power: more draws at low noise."""
    u = torch.rand(n, generator=generator, device=device)
    return eps + (sde.T - eps) * u**power
