"""The reverse-time SDE integrated by torchsde (fixed-step euler, milstein, srk): the `sde` sampler."""
from __future__ import annotations

import math
from typing import Dict, List, Literal, Sequence, Tuple

import torch

from .. import generators
from ..sdes import SDE, ScoreFn, batch_time
from .registry import register_sampler
from .terms import evaluated

SDE_METHODS = ("euler", "milstein", "srk")
SdeMethod = Literal["euler", "milstein", "srk"]


class _Time(float):
    """A time in Python floats, closed under the arithmetic torchsde's steps do on it, with the `.sqrt()` that
    Milstein and SRK call on the step size. Float times keep the step loop off the device: torchsde's Brownian
    interval reads every time it is given into a float, which on a device tensor is a host synchronisation."""

    def _wrap(self, value):
        return _Time(value) if isinstance(value, float) else value

    def __add__(self, other): return self._wrap(float.__add__(self, other))
    def __radd__(self, other): return self._wrap(float.__radd__(self, other))
    def __sub__(self, other): return self._wrap(float.__sub__(self, other))
    def __rsub__(self, other): return self._wrap(float.__rsub__(self, other))
    def __mul__(self, other): return self._wrap(float.__mul__(self, other))
    def __rmul__(self, other): return self._wrap(float.__rmul__(self, other))
    def __truediv__(self, other): return self._wrap(float.__truediv__(self, other))
    def __rtruediv__(self, other): return self._wrap(float.__rtruediv__(self, other))

    def sqrt(self) -> "_Time":
        return _Time(math.sqrt(self))


class _FlippedReverseSDE:
    """The reverse-time SDE in the forward time s = T − t that torchsde integrates, on flattened states (batch, d).

    dx = −[f(x, t) − g(t)²·∇log p_t(x)] ds + g(t) dW_s  (diagonal noise). g depends on t only, so Milstein's
    correction vanishes. s arrives as a Python float: grid values map to the device grid times exactly, stage
    times to T − s computed on the device. Recent drifts are cached by (state identity, s): the first stage and
    diagonal SRK's re-evaluation of earlier stages ask for the same drift, so each distinct (state, time) is one
    score call.
    """

    noise_type, sde_type = "diagonal", "ito"
    CACHE_SIZE = 8  # more than the stages of any torchsde method used here

    def __init__(self, score_fn: ScoreFn, sde: SDE, shape: Sequence[int], grid: Dict[float, torch.Tensor],
                 T: torch.Tensor):
        self.score_fn, self.sde, self.shape, self.grid, self.T = score_fn, sde, tuple(shape), grid, T
        self._cache: List[Tuple[torch.Tensor, float, torch.Tensor]] = []

    def time(self, s: float) -> torch.Tensor:
        return self.grid[s] if s in self.grid else self.T - s

    def f(self, s: float, y: torch.Tensor) -> torch.Tensor:
        for state, time, drift in self._cache:
            if state is y and time == s:
                return drift
        x, t = y.reshape(self.shape), batch_time(self.time(s), y)
        drift = -self.sde.reverse(evaluated(self.score_fn, x, t)).sde(x, t)[0].reshape(y.shape)
        self._cache = (self._cache + [(y, s, drift)])[-self.CACHE_SIZE:]
        return drift

    def g(self, s: float, y: torch.Tensor) -> torch.Tensor:
        x = y.reshape(self.shape)
        g = self.sde.sde(x, batch_time(self.time(s), x))[1]
        return g[:, None].expand_as(y)


@register_sampler("sde", grid="time", few_step_grid=None)
def torchsde_sampler(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, timesteps: torch.Tensor, *,
                     sde_method: SdeMethod = "euler", generator=None, constraint=None) -> torch.Tensor:
    """Reverse SDE with torchsde's fixed-step `euler`, `milstein` (derivative-free) or `srk` on the given grid
    (score calls: steps × the method's stages: 1, 1, 4).

    torchsde integrates forward in time, so the solver runs in s = T − t, one torchsde step per grid interval.
    The Brownian motion is a torchsde.BrownianInterval seeded from `generator` (space-time Lévy area for srk), so
    samples are reproducible. It serves the whole batch at once, so with per-sample generators (SampleGenerators)
    its seed is drawn from all of them together (`SampleGenerators.entropy`): reproducible for the same seeds, but
    a sample then depends on the other samples of its batch. The grid is read to the host once; the steps then
    make no host synchronisation.
    The explicit multi-stage srk needs short steps where β(t) is large: on the cosine schedule (β clipped at 999
    near T) use grid="logsnr", which puts steps there.

    It applies a constraint itself, to the prior draw and to the state after every grid interval: srk evaluates the
    drift at stage states, where the framework's per-evaluation constraint would spend RePaint's rounds on states
    the step then discards (measured: the rounds lost all their effect).
    """
    import torchsde
    from torchsde._core.base_sde import ForwardSDE
    from torchsde._core.methods import select

    s_grid = [_Time(s) for s in (timesteps[0] - timesteps).to(x.dtype).tolist()]  # 0 = s_0 < s_1 < … < T − eps
    if constraint is not None:
        x = constraint(x, timesteps[0], None)
    y = x.reshape(x.shape[0], -1)
    entropy = generators.entropy(generator)
    # dt: the mean step sizes the Brownian tree (left to torchsde, a grid that starts with tiny steps, as λ-uniform
    # ones on rectified flow, builds one too deep to walk)
    bm = torchsde.BrownianInterval(t0=s_grid[0], t1=s_grid[-1], size=tuple(y.shape), dtype=x.dtype, device=x.device,
                                   entropy=entropy, dt=(s_grid[-1] - s_grid[0]) / (len(s_grid) - 1),
                                   levy_area_approximation="space-time" if sde_method == "srk" else "none")
    flipped = _FlippedReverseSDE(score_fn, sde, x.shape, dict(zip(s_grid, timesteps)), timesteps[0])
    options = {"grad_free": True} if sde_method == "milstein" else {}
    solver = select(sde_method, flipped.sde_type)(sde=ForwardSDE(flipped), bm=bm, dt=s_grid[1] - s_grid[0],
                                                  adaptive=False, rtol=0.0, atol=0.0, dt_min=0.0, options=options)
    extra = solver.init_extra_solver_state(s_grid[0], y)
    for i in range(len(s_grid) - 1):
        y, extra = solver.step(s_grid[i], s_grid[i + 1], y, extra)
        if constraint is not None:
            y = constraint(y.reshape(x.shape), timesteps[i + 1], timesteps[i]).reshape(y.shape)
    return y.reshape(x.shape)
