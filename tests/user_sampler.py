"""A sampler as a user writes it in their own file: Euler steps on the probability-flow ODE, registered by name.

Nothing of the package is edited; importing this module makes "user_euler" a sampling method everywhere.
"""
import torch

from sde_diffusion import sampling
from sde_diffusion.sdes import per_sample


@sampling.register_sampler("user_euler")
def user_euler(score_fn, sde, x, timesteps, *, score_scale: float = 1.0):
    """x ← x + Δt·[f(x, t) − ½·g(t)²·score_scale·s(x, t)] from T down to eps (score_scale = 1: the PF ODE)."""
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        t_batch = torch.full((x.shape[0],), t.item(), dtype=x.dtype, device=x.device)
        score = score_fn(x, t_batch)  # first: the framework's constraint acts on x here
        drift, diffusion = sde.sde(x, t_batch)
        velocity = drift - 0.5 * per_sample(diffusion**2, x) * score_scale * score
        x = x + (t_next - t).item() * velocity
    return x

