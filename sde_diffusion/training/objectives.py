"""Training objectives: a noise-level distribution, a weighting and the network's target, in one loss.

Every objective is (Kingma & Gao 2023) a weighting of the ELBO's ε-loss over log-SNR λ = log(α/σ):

    L = E_{t ~ p} E_{x0, z} [ r(t) · w(λ_t) · ‖σ(t)·s(x_t, t) + z‖² ],   x_t = α(t)·x0 + σ(t)·z,

where σ·s + z = ε − ε̂ is the ε-error of whatever the network predicts (the parameterization turns its output into
the score s), p and r come from the noise-level distribution (`training.time_sampling`, noise_levels.py) and w
from the weighting (`training.weighting`, weightings.py). As a density over λ, L = ∫ W(λ)·E‖ε̂ − ε‖²|_λ dλ with
W(λ) = p(λ)·r·w(λ), `effective_weighting`: Kingma & Gao's w(λ) up to their factor ½. With
training.continuous=False the times are the SDE's discrete chain's (DDPM, SMLD) and so are α and σ.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import discrete
from ..distributed import global_rows
from ..errors import ConfigError
from ..parameterization import EDM_SIGMA_DATA
from ..sdes import SDE, ScoreFn, per_sample, sde_class, sde_from_config
from .noise_levels import EDM_P_MEAN, EDM_P_STD, TIME_SAMPLINGS
from .weightings import WEIGHTINGS

LOSSES = ("dsm", "edm")  # training.loss: today's two names, each a (time sampling, weighting) pair

Shard = Tuple[int, int]  # (rank, world size): noise is drawn for the global batch, see distributed.global_rows
SINGLE = (0, 1)
# (t, z, w): the times (batch,), the Gaussian noise (batch, ...) and each example's weight r·w(λ_t) (batch,)
Noise = Tuple[torch.Tensor, ...]
# Draws made to check a noise-level distribution before training
CHECK_DRAWS = 4096


def _reduce(per_element: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
    """(batch, ...) → (batch,): mean or sum over all but the batch dimension."""
    flat = per_element.flatten(1)
    return flat.mean(1) if reduce_mean else flat.sum(1)


def _gaussian(x0: torch.Tensor, generator, total: int, mine) -> torch.Tensor:
    return torch.randn((total, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)[mine]


class Objective:
    """A training loss: `objective(score_fn, x0, generator=None, shard=(0, 1), noise=None)` → the batch mean.

    time_sampling, weighting: specs 'name[:option=value,...]' of registered parts. `draw(x0, generator, shard)`
    draws the (t, z, w) a call would draw (w: each example's weight, computed with the draw); passing them back as
    `noise` gives the same value. A compiled training step draws outside its graph (a torch.Generator cannot be
    traced) and compiles the rest whole.

    A score function with a `log_variance(t) -> (batch,)` attribute (EDM2's learned uncertainty u, set by
    `get_score_fn`) makes each example's loss w·L/exp(u) + u (reduce_mean=False: L sums D dimensions, + D·u).
    """

    def __init__(self, sde: SDE, *, time_sampling: str = "uniform", weighting: str = "eps", continuous: bool = True,
                 eps: float = 1e-5, reduce_mean: bool = True):
        self.sde, self.eps, self.reduce_mean, self.continuous = sde, float(eps), reduce_mean, continuous
        self.sampling, self.sampling_options = TIME_SAMPLINGS.parse(time_sampling, "training.time_sampling")
        self.weighting, self.weighting_options = WEIGHTINGS.parse(weighting, "training.weighting")
        self.chain = None
        if not continuous:
            self.chain = discrete.require_chain(sde, "the DDPM/SMLD loss (training.continuous=False)")
            if self.sampling.name != "discrete" or {"t", "sde"} & set(self.weighting.passed):
                raise ValueError(f"training.continuous=False trains on the SDE's {sde.N}-step chain: use "
                                 "training.time_sampling='discrete' and a weighting of λ alone (not "
                                 f"{self.weighting.name!r}, which reads the continuous process)")
        elif self.sampling.name == "discrete":
            raise ValueError("training.time_sampling='discrete' draws the chain's steps: it needs "
                             "training.continuous=False")
        self._check_draws()

    def __repr__(self) -> str:
        return (f"Objective(time_sampling={self.spec()[0]!r}, weighting={self.spec()[1]!r}, "
                f"continuous={self.continuous})")

    def spec(self) -> Tuple[str, str]:
        """(time sampling, weighting) as text specs."""
        return self.sampling.spec(self.sampling_options), self.weighting.spec(self.weighting_options)

    # --- the parts ---------------------------------------------------------------------------------------
    def times(self, n: int, generator: Optional[torch.Generator] = None, device=None,
              dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """n times from the noise-level distribution and their importance ratios (None: all 1)."""
        passed = {"generator": generator, "eps": self.eps, "device": device, "dtype": dtype}
        out = self.sampling.fn(self.sde, n, **{k: passed[k] for k in self.sampling.passed}, **self.sampling_options)
        t, ratio = out if isinstance(out, tuple) else (out, None)
        return t.to(device=device, dtype=dtype), None if ratio is None else ratio.to(device=device, dtype=dtype)

    def alpha_sigma(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """α and σ at t: the SDE's, or its discrete chain's."""
        return self.chain.alpha_sigma(t) if self.chain is not None else (self.sde.alpha(t), self.sde.sigma(t))

    def weight(self, t: torch.Tensor, ratio: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Each example's weight r·w(λ_t) on its ε-error, (batch,) like t."""
        t64 = t.double()
        alpha, sigma = self.alpha_sigma(t64)
        log_snr = torch.log(alpha) - torch.log(sigma)
        passed = {"t": t64, "sde": self.sde}
        w = self.weighting.fn(log_snr, **{k: passed[k] for k in self.weighting.passed}, **self.weighting_options)
        w = w.to(t.dtype)
        return w if ratio is None else w * ratio

    def draw(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None, shard: Shard = SINGLE) -> Noise:
        total, mine = global_rows(x0.shape[0], *shard)
        t, ratio = self.times(total, generator, x0.device, x0.dtype)
        t, ratio = t[mine], None if ratio is None else ratio[mine]
        return t, _gaussian(x0, generator, total, mine), self.weight(t, ratio)

    # --- the loss ----------------------------------------------------------------------------------------
    def __call__(self, score_fn: ScoreFn, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
                 shard: Shard = SINGLE, noise: Optional[Noise] = None) -> torch.Tensor:
        t, z, *rest = noise if noise is not None else self.draw(x0, generator, shard)
        w = rest[0] if rest else self.weight(t)
        alpha, sigma = self.alpha_sigma(t)
        score = score_fn(per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * z, t)
        loss = w * _reduce((per_sample(sigma, x0) * score + z) ** 2, self.reduce_mean)  # (batch,)
        log_variance = getattr(score_fn, "log_variance", None)
        if log_variance is not None:  # EDM2's uncertainty u: the Gaussian NLL w·L/exp(u) + D·u (D = 1 for a mean)
            u = log_variance(t).to(loss.dtype)
            dims = 1 if self.reduce_mean else x0[0].numel()
            loss = loss / torch.exp(u) + dims * u
        return loss.mean()

    # --- checks --------------------------------------------------------------------------------------------
    def _check_draws(self) -> None:
        """The distribution's draws lie in (0, T] ([0, T] on a chain, noisy at step 0) and its weights are finite
        and ≥ 0; ValueError naming the part otherwise."""
        t, ratio = self.times(CHECK_DRAWS, torch.Generator().manual_seed(0), dtype=torch.float64)
        name = self.sampling.spec(self.sampling_options)
        if t.shape != (CHECK_DRAWS,) or (ratio is not None and ratio.shape != t.shape):
            raise ValueError(f"training.time_sampling={name!r} returned times of shape {tuple(t.shape)} for n = "
                             f"{CHECK_DRAWS}: it must return n times (and optionally n importance ratios)")
        low_ok = (t >= 0) if self.chain is not None else (t > 0)
        if not bool((low_ok & (t <= self.sde.T) & torch.isfinite(t)).all()):
            raise ValueError(f"training.time_sampling={name!r} puts mass outside (0, T = {self.sde.T}] (drew "
                             f"{t.min().item():.4g} … {t.max().item():.4g}): clamp or rescale its times")
        w = self.weight(t, ratio)
        if not bool((torch.isfinite(w) & (w >= 0)).all()):
            bad = t[~(torch.isfinite(w) & (w >= 0))][0].item()
            raise ValueError(f"training.weighting={self.spec()[1]!r} with time sampling {name!r} gives a weight "
                             f"that is negative or not finite (at t = {bad:.4g}): weights must be finite and ≥ 0")


def effective_weighting(what, log_snr: Optional[torch.Tensor] = None, *, time_sampling: Optional[str] = None,
                        weighting: Optional[str] = None, continuous: bool = True, eps: float = 1e-5,
                        draws: int = 400_000, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kingma & Gao's w(λ) of an objective (up to their ½): the weight per unit log-SNR on E‖ε̂ − ε‖², so that the
    loss is ∫ W(λ)·E‖ε̂ − ε‖²|_λ dλ. `what`: an `Objective`; an SDE with the specs time_sampling and weighting
    (default uniform, eps), continuous and eps; or a config (its training objective). Estimated from `draws` times
    of the noise-level distribution (any registered one), as a histogram of λ weighted by each draw's r·w(λ) on
    100 bins (or at the centres `log_snr`, 1-D increasing, equally spaced). Returns (λ at the bin centres, W
    there), float64."""
    if isinstance(what, SDE):
        what = Objective(what, time_sampling=time_sampling or "uniform", weighting=weighting or "eps",
                         continuous=continuous, eps=eps)
    elif not isinstance(what, Objective):  # a config
        t = what.training
        what = get_loss_fn(sde_from_config(what), continuous=t.continuous, likelihood_weighting=t.likelihood_weighting,
                           eps=t.eps, importance_sampling=t.importance_sampling, loss=t.loss,
                           sigma_data=what.model.sigma_data, time_sampling=t.time_sampling, weighting=t.weighting)
    objective = what
    t, ratio = objective.times(draws, torch.Generator().manual_seed(seed), dtype=torch.float64)
    alpha, sigma = objective.alpha_sigma(t)
    lam = torch.log(alpha) - torch.log(sigma)
    weight = objective.weight(t, ratio)
    if log_snr is None:
        finite = lam[torch.isfinite(lam)]
        log_snr = torch.linspace(finite.min().item(), finite.max().item(), 101, dtype=torch.float64)
        log_snr = 0.5 * (log_snr[1:] + log_snr[:-1])
    log_snr = torch.as_tensor(log_snr, dtype=torch.float64)
    width = (log_snr[1] - log_snr[0]).item() if len(log_snr) > 1 else 1.0
    edges = torch.cat([log_snr - width / 2, log_snr[-1:] + width / 2])
    index = torch.bucketize(lam, edges) - 1
    inside = (index >= 0) & (index < len(log_snr))
    totals = torch.zeros(len(log_snr), dtype=torch.float64).index_add_(0, index[inside], weight[inside])
    return log_snr, totals / (draws * width)


# --------------------------------------------------------------------------------------------------
# Configured objectives
# --------------------------------------------------------------------------------------------------
def legacy_parts(*, continuous: bool = True, likelihood_weighting: bool = False, importance_sampling: bool = False,
                 loss: str = "dsm", sigma_data: float = EDM_SIGMA_DATA) -> Tuple[str, str]:
    """(time sampling, weighting) meant by score_sde's keys and training.loss (ValueError for combinations
    without a meaning)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; available: {list(LOSSES)}")
    if loss == "edm":
        if not continuous or likelihood_weighting or importance_sampling:
            raise ValueError("training.loss='edm' has its own weighting λ(σ) and log-normal noise levels: set "
                             "training.continuous=True, training.likelihood_weighting=False and "
                             "training.importance_sampling=False")
        return f"log_normal:p_mean={EDM_P_MEAN},p_std={EDM_P_STD}", f"edm:sigma_data={sigma_data}"
    if importance_sampling and not (continuous and likelihood_weighting):
        raise ValueError("training.importance_sampling=True samples t for the likelihood-weighted continuous loss: "
                         "set training.likelihood_weighting=True and training.continuous=True, or "
                         "training.importance_sampling=False")
    if not continuous:
        if likelihood_weighting:
            raise ValueError("training.likelihood_weighting=True (likelihood weighting) applies to the continuous "
                             "loss only: set training.continuous=True or training.likelihood_weighting=False")
        return "discrete", "eps"
    return ("importance" if importance_sampling else "uniform"), ("elbo" if likelihood_weighting else "eps")


def get_loss_fn(sde: SDE, *, continuous: bool = True, reduce_mean: bool = True, likelihood_weighting: bool = False,
                eps: float = 1e-5, importance_sampling: bool = False, loss: str = "dsm",
                sigma_data: float = EDM_SIGMA_DATA, time_sampling: Optional[str] = None,
                weighting: Optional[str] = None) -> Objective:
    """The `Objective` of config.training: time_sampling and weighting (specs), each by default the one that
    score_sde's keys (continuous, likelihood_weighting, importance_sampling) and `loss` ("dsm", "edm") mean."""
    default_sampling, default_weighting = legacy_parts(continuous=continuous,
                                                       likelihood_weighting=likelihood_weighting,
                                                       importance_sampling=importance_sampling, loss=loss,
                                                       sigma_data=sigma_data)
    return Objective(sde, time_sampling=time_sampling or default_sampling, weighting=weighting or default_weighting,
                     continuous=continuous, eps=eps, reduce_mean=reduce_mean)


def check_config(config) -> None:
    """training.loss, training.eps, the weighting keys and the objective's parts. Raises ConfigError naming the key."""
    t = config.training
    if t.loss not in LOSSES:
        raise ConfigError(f"training.loss={t.loss!r} is not one of {list(LOSSES)}")
    if not 0.0 < t.eps < 1.0:
        raise ConfigError(f"training.eps must lie in (0, 1), got {t.eps}")
    try:
        legacy_parts(continuous=t.continuous, likelihood_weighting=t.likelihood_weighting,
                     importance_sampling=t.importance_sampling, loss=t.loss)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    named = [k for k in ("time_sampling", "weighting") if t.get(k)]
    legacy = [k for k, on in (("likelihood_weighting", t.likelihood_weighting),
                              ("importance_sampling", t.importance_sampling), ("loss", t.loss != "dsm")) if on]
    if named and legacy:
        raise ConfigError(f"training.{named[0]} names a part of the objective, and training.{legacy[0]} chooses one "
                          "the old way: set the objective by training.time_sampling and training.weighting alone "
                          "(likelihood_weighting → weighting='elbo', importance_sampling → time_sampling="
                          "'importance', loss='edm' → time_sampling='log_normal', weighting='edm')")
    for key in ("time_sampling", "weighting"):
        if t.get(key):
            registry = TIME_SAMPLINGS if key == "time_sampling" else WEIGHTINGS
            try:
                registry.parse(t[key], f"training.{key}")
            except ValueError as err:
                raise ConfigError(str(err)) from None
    if named and sde_class(t.sde) is not None:  # the parts together, on the process: draws in (0, T], weights ≥ 0
        try:
            get_loss_fn(sde_from_config(config), continuous=t.continuous, eps=t.eps, time_sampling=t.time_sampling,
                        weighting=t.weighting, sigma_data=config.model.sigma_data)
        except ValueError as err:
            raise ConfigError(str(err)) from None
