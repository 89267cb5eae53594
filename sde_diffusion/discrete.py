"""Discrete-time chains over an SDE: DDPM's for VP (Ho et al. 2020) and SMLD's for VE (Song & Ermon 2019).

A chain has N levels x_i = α_i·x_0 + σ_i·z, i = 0..N−1, placed at the SDE's grid times t_i = i/(N−1)·T. The
discrete losses (training.continuous=False), the DDPM variational bound on the chain (likelihood.noise_chain),
discrete network labels (parameterization) and the Langevin corrector's step scale read it from here.

`chain_for(sde)` looks the chain up by the SDE's class (through its base classes); SDEs without one give None.
A user adds a chain for their own SDE class with `@register_chain(MySDE)` on a `DiscreteChain` subclass.
"""
from __future__ import annotations

import abc
from typing import Callable, Dict, Optional, Tuple, Type

import torch

from .sdes import SDE, VESDE, VPSDE, as_time, batch_time, grid_index, per_sample

Tensor = torch.Tensor


class DiscreteChain(abc.ABC):
    """The N-level chain of `sde` on its time grid; `alphas`, `sigmas` are float64 (N,) with level i at t_i."""

    def __init__(self, sde: SDE):
        self.sde, self.N, self.T = sde, sde.N, sde.T

    @property
    @abc.abstractmethod
    def alphas(self) -> Tensor:
        """α_0..α_{N−1} (float64)."""

    @property
    @abc.abstractmethod
    def sigmas(self) -> Tensor:
        """σ_0..σ_{N−1} (float64)."""

    def step_index(self, t) -> Tensor:
        """Index i of the level that time t belongs to (t = i/(N−1)·T, truncated in between): long, t's shape."""
        return grid_index(t, self.N, self.T)

    def time(self, i) -> Tensor:
        """The grid time t_i = i/(N−1)·T of level i (float64)."""
        return torch.as_tensor(i, dtype=torch.float64) / (self.N - 1) * self.T

    def alpha_sigma(self, t) -> Tuple[Tensor, Tensor]:
        """α_i, σ_i at the level of time t, in t's dtype and on its device."""
        like = as_time(t)
        i = self.step_index(t).cpu()
        return self.alphas[i].to(like), self.sigmas[i].to(like)

    def label(self, t) -> Tensor:
        """The integer noise label a discrete-time network receives for time t (DDPM: i), in t's dtype."""
        return self.step_index(t).to(as_time(t))

    def forward_step(self, x: Tensor, t) -> Tuple[Tensor, Tensor]:
        """One step from level i−1 to level i (i the level of t) as x_i = x_{i−1} + f + G·z: returns (f, G (batch,)).

        From x_i = α_i x_0 + σ_i z: α_{i|i−1} = α_i/α_{i−1}, G² = σ_i² − α_{i|i−1}² σ_{i−1}² (level −1 is the data).
        """
        i = self.step_index(batch_time(t, x)).cpu()
        prev = (i - 1).clamp(min=0)
        first = i == 0
        a_prev = torch.where(first, torch.ones_like(self.alphas[i]), self.alphas[prev])
        s_prev = torch.where(first, torch.zeros_like(self.sigmas[i]), self.sigmas[prev])
        a = self.alphas[i] / a_prev
        G = torch.sqrt((self.sigmas[i] ** 2 - a**2 * s_prev**2).clamp(min=0.0))
        return per_sample(a - 1.0, x).to(x) * x, G.to(x)

    def langevin_step_scale(self, t) -> Tensor:
        """Factor of the Langevin corrector's step size at time t: 1 unless the chain says otherwise."""
        return torch.ones_like(as_time(t))


CHAINS: Dict[Type[SDE], Callable[[SDE], DiscreteChain]] = {}


def register_chain(sde_class: Type[SDE]):
    """Class decorator: make a `DiscreteChain` subclass the chain of `sde_class` (and of its subclasses)."""
    def decorate(chain_class):
        CHAINS[sde_class] = chain_class
        return chain_class
    return decorate


@register_chain(VPSDE)
class DDPMChain(DiscreteChain):
    """DDPM: β_i of the SDE's β schedule (`schedule.discrete_betas(N)`), ᾱ_i = Π_{j≤i}(1 − β_j), α_i = √ᾱ_i,
    σ_i = √(1 − ᾱ_i). Network labels are the grid position (N−1)·t/T. The Langevin step is scaled by 1 − β_i (score_sde's corrector)."""

    def __init__(self, sde: VPSDE):
        super().__init__(sde)
        self.betas = sde.schedule.discrete_betas(sde.N)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, 0)

    @property
    def alphas(self):
        return torch.sqrt(self.alphas_cumprod)

    @property
    def sigmas(self):
        return torch.sqrt(1.0 - self.alphas_cumprod)

    def label(self, t):
        """The grid position (N−1)·t/T (= i on the grid; fractional in between), as score_sde's DDPM labels."""
        t = torch.as_tensor(t)
        return (self.N - 1) * t / self.T

    def forward_step(self, x, t):
        """x_{i+1} = √(1 − β_i)·x_i + √β_i·z (the SDE's own `discretize`)."""
        return self.sde.discretize(x, t)

    def langevin_step_scale(self, t):
        """1 − β_i in float32, as score_sde's `alphas` (its Langevin corrector multiplies the step by it)."""
        i = self.step_index(t).cpu()
        return (1.0 - self.betas).float()[i].to(as_time(t))


@register_chain(VESDE)
class SMLDChain(DiscreteChain):
    """SMLD: α_i = 1, σ_i = σ(t_i) (geometric from σ_min to σ_max). Network labels count from σ_max: N − 1 − i."""

    @property
    def alphas(self):
        return torch.ones(self.N, dtype=torch.float64)

    @property
    def sigmas(self):
        return self.sde.level_sigmas().double()

    def label(self, t):
        """The SMLD level index counted from σ_max (0 = σ_max), as in NCSN."""
        return (self.N - 1 - self.step_index(t)).to(as_time(t))

    def forward_step(self, x, t):
        """x_{i+1} = x_i + √(σ_{i+1}² − σ_i²)·z (the SDE's own `discretize`)."""
        return self.sde.discretize(x, t)


def chain_class(sde_class: Type[SDE]) -> Optional[Callable[[SDE], DiscreteChain]]:
    """The chain registered for `sde_class` or its nearest base class; None if there is none."""
    for cls in sde_class.__mro__:
        if cls in CHAINS:
            return CHAINS[cls]
    return None


def chain_for(sde: SDE) -> Optional[DiscreteChain]:
    """The discrete chain of `sde`, or None for an SDE without one (sub-VP, EDM, user SDEs unless registered)."""
    make = chain_class(type(sde))
    return None if make is None else make(sde)


def require_chain(sde: SDE, what: str = "a discrete-time (DDPM/SMLD) model") -> DiscreteChain:
    """`chain_for(sde)`, or a ValueError that says `what` needs it and how to do without."""
    chain = chain_for(sde)
    if chain is None:
        raise ValueError(f"{what} needs a discrete chain, and {type(sde).__name__} has none (chains exist for "
                         f"{sorted(c.__name__ for c in CHAINS)}): use the continuous-time formulation "
                         "(training.continuous=True), or register one with discrete.register_chain")
    return chain


def langevin_step_scale(sde: SDE, t) -> Tensor:
    """Factor of the Langevin corrector's step size at time t: 1 − β_i of the DDPM chain for VP, 1 otherwise."""
    chain = chain_for(sde)
    return torch.ones_like(as_time(t)) if chain is None else chain.langevin_step_scale(t)
