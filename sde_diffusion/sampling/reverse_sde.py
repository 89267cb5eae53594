"""The reverse-time SDE integrated by torchsde (fixed-step euler, milstein, srk): the `sde` sampler."""
from __future__ import annotations

from typing import Dict, List, Literal, Sequence, Tuple

import torch

from ..sdes import SDE, ScoreFn, batch_time
from .registry import register_sampler
from .terms import evaluated

SDE_METHODS = ("euler", "milstein", "srk")
SdeMethod = Literal["euler", "milstein", "srk"]


class _FlippedReverseSDE:
    """The reverse-time SDE in the forward time s = T − t that torchsde integrates, on flattened states (batch, d).

    dx = −[f(x, t) − g(t)²·∇log p_t(x)] ds + g(t) dW_s  (diagonal noise). g depends on t only, so Milstein's
    correction vanishes. Recent drifts are cached by (state identity, s): torchsde's shape check and the first
    stage ask for the same drift, and its diagonal SRK re-evaluates earlier stages; the cache makes each distinct
    (state, time) one score call. Grid values of s map back to the float64 grid times exactly.
    """

    noise_type, sde_type = "diagonal", "ito"
    CACHE_SIZE = 8  # more than the stages of any torchsde method used here

    def __init__(self, score_fn: ScoreFn, sde: SDE, shape: Sequence[int], grid: Dict[float, torch.Tensor]):
        self.score_fn, self.sde, self.shape, self.grid = score_fn, sde, tuple(shape), grid
        self.T = next(iter(grid.values())).item()
        self._cache: List[Tuple[torch.Tensor, float, torch.Tensor]] = []

    def time(self, s) -> torch.Tensor:
        key = float(s)
        return self.grid[key] if key in self.grid else torch.tensor(self.T - key, dtype=torch.float64)

    def f(self, s, y):
        key = float(s)
        for state, time, drift in self._cache:
            if state is y and time == key:
                return drift
        x, t = y.reshape(self.shape), batch_time(self.time(s), y)
        drift = -self.sde.reverse(evaluated(self.score_fn, x, t)).sde(x, t)[0].reshape(y.shape)
        self._cache = (self._cache + [(y, key, drift)])[-self.CACHE_SIZE:]
        return drift

    def g(self, s, y):
        x = y.reshape(self.shape)
        g = self.sde.sde(x, batch_time(self.time(s), x))[1]
        return g[:, None].expand_as(y)


@register_sampler("sde")
def torchsde_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                     sde_method: SdeMethod = "euler", generator=None, constraint=None) -> torch.Tensor:
    """Reverse SDE with torchsde's fixed-step `euler`, `milstein` (derivative-free) or `srk` on the given grid
    (score calls: steps × the method's stages: 1, 1, 4).

    torchsde integrates forward in time, so the solver runs in s = T − t. The Brownian motion is a
    torchsde.BrownianInterval seeded from `generator` (space-time Lévy area for srk), so samples are reproducible.
    The explicit multi-stage srk needs short steps where β(t) is large: on the cosine schedule (β clipped at 999
    near T) use grid="logsnr", which puts steps there.

    It applies a constraint itself, to the prior draw and to the state after every grid interval: srk evaluates the
    drift at stage states, where the framework's per-evaluation constraint would spend RePaint's rounds on states
    the step then discards (measured: the rounds lost all their effect).
    """
    import torchsde

    s_grid = (timesteps[0] - timesteps).to(x.dtype)  # 0 = s_0 < s_1 < … < T − eps
    if constraint is not None:
        x = constraint(x, timesteps[0], None)
    y = x.reshape(x.shape[0], -1)
    entropy = None
    if generator is not None:
        entropy = int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item())
    bm = torchsde.BrownianInterval(t0=s_grid[0], t1=s_grid[-1], size=tuple(y.shape), dtype=x.dtype, device=x.device,
                                   entropy=entropy,
                                   levy_area_approximation="space-time" if sde_method == "srk" else "none")
    grid = {float(s): t for s, t in zip(s_grid, timesteps)}
    flipped = _FlippedReverseSDE(score_fn, sde, x.shape, grid)
    options = {"grad_free": True} if sde_method == "milstein" else None
    for i in range(len(s_grid) - 1):
        interval = s_grid[i:i + 2]
        # dt larger than the interval: torchsde clips the step at the interval's end, so exactly one step is taken.
        y = torchsde.sdeint(flipped, y, interval, bm=bm, method=sde_method, dt=2 * (interval[1] - interval[0]).item(),
                            options=options)[-1]
        if constraint is not None:
            y = constraint(y.reshape(x.shape), timesteps[i + 1], timesteps[i]).reshape(y.shape)
    return y.reshape(x.shape)
