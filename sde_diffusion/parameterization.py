"""What a network predicts and what it is conditioned on, apart from the network and the SDE.

A `Parameterization` turns a network into a score function: it builds the network's input from x_t, the noise
conditioning from t, and converts the output to ∇ₓ log p_t(x) (and back, `output`, for losses and tests). With
x_t = α·x_0 + σ·z, score s, ε̂ = −σ·s and x̂_0 = (x + σ²·s)/α:

| name    | the network predicts                          | score from output `o`                  | default input     |
|---------|-----------------------------------------------|----------------------------------------|-------------------|
| `eps`   | the noise ε (DDPM)                             | −o/σ                                   | 999·t/T (`time`)  |
| `score` | σ·score (score_sde's VE; with scale_by_sigma) | o/σ                                    | σ(t) (`sigma`)    |
| `score_table` | σ·score, over the SMLD level at ⌊c⌋ (a quirk)  | o/σ_⌊c⌋ (VE; see the class)            | σ(t) (`sigma`)    |
| `x0`    | the clean data x̂_0                            | (α·o − x)/σ²                           | 999·t/T (`time`)  |
| `v`     | v = α·ε − σ·x_0 (Salimans & Ho)               | −(σ·x + α·o)/((α² + σ²)·σ)             | 999·t/T (`time`)  |
| `velocity` | u = dx_t/dt = α′·x_0 + σ′·ε (flow matching) | −(α·o − α′·x)/((α·σ′ − σ·α′)·σ)        | 999·t/T (`time`)  |
| `edm`   | EDM's F of D = c_skip·x̃ + c_out·F(c_in·x̃)   | (D − x̃)/(α·σ̃²), x̃ = x/α, σ̃ = σ/α      | ¼·ln σ̃ (`log_sigma`) |
| `consistency` | F of a consistency model f = c_skip·x̃ + c_out·F, f(x, eps) = x̃ | (α·f − x)/σ²          | ¼·ln σ̃ (`log_sigma`) |

Noise conditioning (`CONDITIONINGS`): `time` 999·t/T, `step` the discrete chain's label (DDPM: (N−1)·t/T, SMLD:
the level counted from σ_max), `sigma` σ(t), `log_sigma` ¼·ln(σ/α). With continuous=False the network is a
discrete-time one: it sees `step` labels and σ, α are the chain's σ_i, α_i (sde_diffusion.discrete).

`resolve(sde, continuous)` picks score_sde's convention for the built-in SDEs (table `AUTO`); config key
`model.parameterization = "auto"` does the same, so configs and checkpoints written for score_sde keep their
meaning. Shapes: x (batch, ...), t (batch,), per-sample coefficients (batch,).
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Dict, Optional, Tuple, Type, Union

import torch

from . import discrete
from .students import DISTILL_METHODS, student_method
from .errors import ConfigError, choice
from .sdes import SDE, EDMSDE, RectifiedFlowSDE, SubVPSDE, VESDE, VPSDE, batch_time, per_sample, sde_class

Tensor = torch.Tensor
Network = Callable[[Tensor, Tensor], Tensor]  # (network input, noise condition) -> output

# Continuous-time networks see t scaled to DDPM's step indices 0..999 (as in score_sde), whatever N is.
DDPM_TIME_SCALE = 999.0
# EDM's data standard deviation σ_data (Karras et al. 2022, Table 1).
EDM_SIGMA_DATA = 0.5
AUTO = "auto"


def edm_coefficients(sigma: Tensor, sigma_data: float = EDM_SIGMA_DATA) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's preconditioning at noise level σ (Karras et al. 2022, Table 1): (c_skip, c_out, c_in, c_noise) =
    (σ_d²/(σ² + σ_d²), σ·σ_d/√(σ² + σ_d²), 1/√(σ² + σ_d²), ¼·ln σ)."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / torch.sqrt(total), 1.0 / torch.sqrt(total), 0.25 * torch.log(sigma)


# --------------------------------------------------------------------------------------------------
# Noise conditioning: what the network sees of t
# --------------------------------------------------------------------------------------------------
def _time_condition(p: "Parameterization", t: Tensor) -> Tensor:
    return DDPM_TIME_SCALE * t / p.sde.T


def _step_condition(p: "Parameterization", t: Tensor) -> Tensor:
    return p.label_chain.label(t)


def _sigma_condition(p: "Parameterization", t: Tensor) -> Tensor:
    return p.alpha_sigma(t)[1]


def _log_sigma_condition(p: "Parameterization", t: Tensor) -> Tensor:
    alpha, sigma = p.alpha_sigma(t)
    return 0.25 * torch.log(sigma / alpha)


CONDITIONINGS: Dict[str, Callable[["Parameterization", Tensor], Tensor]] = {
    "time": _time_condition, "step": _step_condition, "sigma": _sigma_condition, "log_sigma": _log_sigma_condition}


# --------------------------------------------------------------------------------------------------
# Parameterizations
# --------------------------------------------------------------------------------------------------
class Parameterization(abc.ABC):
    """Network ↔ score for `sde`. continuous=False: a discrete-time network on the SDE's chain (σ_i, α_i, labels).

    conditioning: a key of CONDITIONINGS, or "auto" (the class's `default_conditioning`; "step" when discrete).
    """

    name: str = ""
    default_conditioning: str = "time"

    def __init__(self, sde: SDE, *, continuous: bool = True, conditioning: str = AUTO,
                 sigma_data: float = EDM_SIGMA_DATA):
        self.sde, self.continuous, self.sigma_data = sde, continuous, sigma_data
        self.chain = None if continuous else discrete.require_chain(sde, "a discrete-time network (continuous=False)")
        if conditioning == AUTO:
            conditioning = self.default_conditioning if continuous else "step"
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown noise conditioning {conditioning!r}; available: {sorted(CONDITIONINGS)}")
        self.label_chain = discrete.require_chain(sde, "noise_conditioning='step'") if conditioning == "step" else None
        self.conditioning = conditioning

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.sde).__name__}, continuous={self.continuous}, "
                f"conditioning={self.conditioning!r})")

    def alpha_sigma(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        """α, σ at time t (batch,): the SDE's α(t), σ(t), or the chain's α_i, σ_i for a discrete-time network."""
        if self.chain is not None:
            return self.chain.alpha_sigma(t)
        return self.sde.alpha(t), self.sde.sigma(t)

    def condition(self, t: Tensor) -> Tensor:
        """The noise-conditioning input (batch,) for times t (batch,)."""
        return CONDITIONINGS[self.conditioning](self, t)

    def network_input(self, x: Tensor, t: Tensor) -> Tensor:
        """What the network is given for x_t (x itself unless the parameterization scales it)."""
        return x

    @abc.abstractmethod
    def score(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """∇ₓ log p_t(x) from the network's output at (x, t)."""

    @abc.abstractmethod
    def output(self, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The network output whose `score` is the given score (the inverse of `score`)."""

    def score_fn(self, network: Network) -> Callable[[Tensor, Tensor], Tensor]:
        """score_fn(x, t) for `network(input, condition) -> output`; t a float or (batch,) tensor."""

        def score_fn(x: Tensor, t) -> Tensor:
            t = batch_time(t, x)
            output = network(self.network_input(x, t), self.condition(t))
            return self.score(output.to(x.dtype), x, t)  # float32 again after autocast

        return score_fn


PARAMETERIZATIONS: Dict[str, Type[Parameterization]] = {}


def register_parameterization(name: str):
    """Class decorator: make a `Parameterization` subclass available as `model.parameterization = name`."""
    def decorate(cls):
        cls.name = name
        PARAMETERIZATIONS[name] = cls
        return cls
    return decorate


@register_parameterization("eps")
class EpsPrediction(Parameterization):
    """The network predicts the noise ε: score = −output/σ."""

    def score(self, output, x, t):
        return -output / per_sample(self.alpha_sigma(t)[1], output)

    def output(self, score, x, t):
        return -per_sample(self.alpha_sigma(t)[1], score) * score


@register_parameterization("score")
class ScaledScorePrediction(Parameterization):
    """The network predicts σ·score (score_sde's VE networks; model.scale_by_sigma): score = output/σ."""

    default_conditioning = "sigma"

    def score(self, output, x, t):
        return output / per_sample(self.alpha_sigma(t)[1], output)

    def output(self, score, x, t):
        return per_sample(self.alpha_sigma(t)[1], score) * score


@register_parameterization("score_table")
class LevelTableScorePrediction(Parameterization):
    """σ·score divided by the SMLD level table at the integer part of the noise condition (VE only):
    score = output / σ_⌊c⌋, σ_j = exp(linspace(ln σ_max, ln σ_min, N))[j], c the network's condition (σ(t)).

    This is score_sde_pytorch's function for a VE network with the positional embedding and model.scale_by_sigma:
    its NCSN++ divides by `sigmas[time_cond.long()]`, meant for discrete level labels, also when it is given the
    continuous σ(t); so it divides by σ_max at σ(t) < 1. With discrete labels (continuous=False, conditioning
    'step') it equals 'score'. Loaded reference checkpoints use it to reproduce the reference's score.
    """

    default_conditioning = "sigma"

    def __init__(self, sde: SDE, **kw):
        super().__init__(sde, **kw)
        if not isinstance(sde, VESDE):
            raise ValueError(f"the 'score_table' parameterization indexes the SMLD levels of a VE SDE, not "
                             f"{type(sde).__name__}")
        self.table = torch.exp(torch.linspace(math.log(sde.sigma_max), math.log(sde.sigma_min), sde.N,
                                              dtype=torch.float64))

    def divisor(self, t: Tensor) -> Tensor:
        """σ_⌊c⌋ for times t (batch,), float64; ⌊·⌋ truncates toward zero as the reference's `.long()`."""
        index = self.condition(t).long()
        if index.min() < 0 or index.max() >= len(self.table):
            raise ValueError(f"noise conditions {self.condition(t).tolist()} index outside the {len(self.table)} "
                             "SMLD levels")
        return self.table.to(index.device)[index]

    def score(self, output, x, t):
        return output / per_sample(self.divisor(t), output).to(output.dtype)

    def output(self, score, x, t):
        return per_sample(self.divisor(t), score).to(score.dtype) * score


@register_parameterization("x0")
class DataPrediction(Parameterization):
    """The network predicts the clean data x̂_0: score = (α·x̂_0 − x)/σ²."""

    def score(self, output, x, t):
        alpha, sigma = (per_sample(v, x) for v in self.alpha_sigma(t))
        return (alpha * output - x) / sigma**2

    def output(self, score, x, t):
        alpha, sigma = (per_sample(v, x) for v in self.alpha_sigma(t))
        return (x + sigma**2 * score) / alpha


@register_parameterization("v")
class VPrediction(Parameterization):
    """The network predicts v = α·ε − σ·x_0 (Salimans & Ho 2022; diffusers' "v_prediction"). With x = α·x_0 + σ·ε:
    x̂_0 = (α·x − σ·v)/(α² + σ²), ε̂ = (σ·x + α·v)/(α² + σ²) and score = −ε̂/σ (α² + σ² = 1 on VP)."""

    def score(self, output, x, t):
        alpha, sigma = (per_sample(v, x) for v in self.alpha_sigma(t))
        return -(sigma * x + alpha * output) / ((alpha**2 + sigma**2) * sigma)

    def output(self, score, x, t):
        alpha, sigma = (per_sample(v, x) for v in self.alpha_sigma(t))
        eps, x0 = -sigma * score, (x + sigma**2 * score) / alpha
        return alpha * eps - sigma * x0


@register_parameterization("velocity")
class VelocityPrediction(Parameterization):
    """The network predicts the flow-matching velocity u = dx_t/dt = α′·x_0 + σ′·ε (ε − x_0 for α = 1 − t, σ = t).
    From the SDE's drift f = α′/α and g² = dσ²/dt − 2f·σ²: α′ = f·α, σ′ = (g² + 2f·σ²)/(2σ). With d = α·σ′ − σ·α′
    (> 0: σ/α grows with t): x̂_0 = (σ′·x − σ·u)/d, ε̂ = (α·u − α′·x)/d and score = −ε̂/σ. On a discrete chain α, σ
    are the chain's α_i, σ_i and α′, σ′ those of the SDE it discretizes, at the level's time."""

    def _derivatives(self, x: Tensor, t: Tensor):
        alpha, sigma = (per_sample(v, x) for v in self.alpha_sigma(t))
        alpha_t, sigma_t = (per_sample(v, x) for v in (self.sde.alpha(t), self.sde.sigma(t)))
        f = per_sample(self.sde.drift_coefficient(t), x)
        g2 = per_sample(self.sde.diffusion_squared(t), x)
        return alpha, sigma, f * alpha_t, (g2 + 2 * f * sigma_t**2) / (2 * sigma_t)

    def score(self, output, x, t):
        alpha, sigma, d_alpha, d_sigma = self._derivatives(x, t)
        eps = (alpha * output - d_alpha * x) / (alpha * d_sigma - sigma * d_alpha)
        return -eps / sigma

    def output(self, score, x, t):
        alpha, sigma, d_alpha, d_sigma = self._derivatives(x, t)
        eps, x0 = -sigma * score, (x + sigma**2 * score) / alpha
        return d_alpha * x0 + d_sigma * eps


@register_parameterization("edm")
class EDMPreconditioning(Parameterization):
    """EDM's preconditioned denoiser in the scaled variable x̃ = x/α at noise level σ̃ = σ/α (any SDE):
    D(x̃; σ̃) = c_skip·x̃ + c_out·F(c_in·x̃; c_noise), and the score is (D − x̃)/(α·σ̃²).

    D − x̃ = c_out·F − (1 − c_skip)·x̃ with 1 − c_skip = σ̃²/(σ̃² + σ_d²) is used as written, without cancellation.
    """

    default_conditioning = "log_sigma"

    def _scaled(self, x: Tensor, t: Tensor):
        alpha, sigma = (per_sample(v, x) for v in self.alpha_sigma(t))
        sigma_tilde = sigma / alpha
        c_skip, c_out, c_in, _ = edm_coefficients(sigma_tilde, self.sigma_data)
        one_minus_skip = sigma_tilde**2 / (sigma_tilde**2 + self.sigma_data**2)
        return alpha, sigma_tilde, x / alpha, c_out, c_in, one_minus_skip

    def network_input(self, x, t):
        _, _, x_tilde, _, c_in, _ = self._scaled(x, t)
        return c_in * x_tilde

    def score(self, output, x, t):
        alpha, sigma_tilde, x_tilde, c_out, _, one_minus_skip = self._scaled(x, t)
        return (c_out * output - one_minus_skip * x_tilde) / (alpha * sigma_tilde**2)

    def output(self, score, x, t):
        alpha, sigma_tilde, x_tilde, c_out, _, one_minus_skip = self._scaled(x, t)
        return (alpha * sigma_tilde**2 * score + one_minus_skip * x_tilde) / c_out

    def denoiser(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """D(x̃; σ̃) = c_skip·x̃ + c_out·F: the denoised estimate of x_0 from the network output F."""
        _, _, x_tilde, c_out, _, one_minus_skip = self._scaled(x, t)
        return (1.0 - one_minus_skip) * x_tilde + c_out * output



def consistency_coefficients(s: Tensor, s_min: float, sigma_data: float = EDM_SIGMA_DATA
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of a consistency model at noise level s = σ/α with its boundary at s_min
    (Song et al. 2023, App. C): c_skip = σ_d²/((s − s_min)² + σ_d²), c_out = σ_d·(s − s_min)/√(σ_d² + s²),
    c_in = 1/√(s² + σ_d²), c_noise = ¼·ln s. At s = s_min: c_skip = 1 and c_out = 0 exactly."""
    offset = s - s_min
    c_skip = sigma_data**2 / (offset**2 + sigma_data**2)
    c_out = sigma_data * offset / torch.sqrt(sigma_data**2 + s**2)
    return c_skip, c_out, 1.0 / torch.sqrt(s**2 + sigma_data**2), 0.25 * torch.log(s)


@register_parameterization("consistency")
class ConsistencyParameterization(Parameterization):
    """A consistency model f(x_t, t) (Song et al. 2023) in EDM's frame x̃ = x/α, s = σ/α, for any SDE:
    f = c_skip(s)·x̃ + c_out(s)·F(c_in(s)·x̃, c_noise(s)) with the boundary at s_min = s(eps), so f(x, eps) = x̃.

    f maps every point of a probability-flow trajectory to its end at eps (x̃ units), and is read as Tweedie's x̂₀:
    score = (α·f − x)/σ², so every sampler and job can run it; the `consistency` sampler takes one call per step.
    eps: the smallest time (default the SDE's `default_eps`, where samplers stop).
    """

    default_conditioning = "log_sigma"

    def __init__(self, sde: SDE, *, eps: Optional[float] = None, **kw):
        super().__init__(sde, **kw)
        if not self.continuous:
            raise ValueError("a consistency model maps any time of the probability-flow ODE to eps: it is a "
                             "continuous-time network (training.continuous=True)")
        self.eps = sde.default_eps if eps is None else float(eps)
        alpha, sigma = self.alpha_sigma(torch.tensor([self.eps], dtype=torch.float64))
        self.s_min = (sigma / alpha).item()

    def _frame(self, x: Tensor, t: Tensor):
        """α, σ (broadcast against x), x̃ = x/α and the coefficients at s = σ/α."""
        alpha, sigma = (per_sample(v, x) for v in self.alpha_sigma(t))
        return alpha, sigma, x / alpha, consistency_coefficients(sigma / alpha, self.s_min, self.sigma_data)

    def network_input(self, x, t):
        _, _, x_tilde, (_, _, c_in, _) = self._frame(x, t)
        return c_in * x_tilde

    def consistency(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """f(x, t) = c_skip·x̃ + c_out·F from the network output F."""
        _, _, x_tilde, (c_skip, c_out, _, _) = self._frame(x, t)
        return c_skip * x_tilde + c_out * output

    def score(self, output, x, t):
        alpha, sigma, _, _ = self._frame(x, t)
        return (alpha * self.consistency(output, x, t) - x) / sigma**2

    def output(self, score, x, t):
        """F with (α·f − x)/σ² = score; at s = s_min (c_out = 0) f = x̃ whatever F is, and F = 0 is returned."""
        alpha, sigma, x_tilde, (c_skip, c_out, _, _) = self._frame(x, t)
        x0 = (x + sigma**2 * score) / alpha
        safe = torch.where(c_out == 0, torch.ones_like(c_out), c_out)
        return torch.where(c_out == 0, torch.zeros_like(x0), (x0 - c_skip * x_tilde) / safe)

    def consistency_fn(self, network: Network) -> Callable[[Tensor, Tensor], Tensor]:
        """f(x, t) for `network(input, condition) -> F`; t a float or (batch,) tensor."""

        def consistency_fn(x: Tensor, t) -> Tensor:
            t = batch_time(t, x)
            output = network(self.network_input(x, t), self.condition(t))
            return self.consistency(output.to(x.dtype), x, t)

        return consistency_fn


# Parameterizations in which the network's output divided by a σ is the score (config model.scale_by_sigma).
SCALED_BY_SIGMA = ("score", "score_table")

# score_sde's conventions for the built-in SDEs (and EDM's for its own): (parameterization, continuous conditioning).
# Discrete-time networks (continuous=False) always see the chain's step labels.
AUTO_TABLE: Dict[Type[SDE], Tuple[str, str]] = {
    VPSDE: ("eps", "time"),
    SubVPSDE: ("eps", "time"),
    VESDE: ("score", "sigma"),
    EDMSDE: ("edm", "log_sigma"),
    RectifiedFlowSDE: ("velocity", "time"),
}


def auto_choice(sde_class: Type[SDE]) -> Tuple[str, str]:
    """(parameterization, conditioning) of AUTO_TABLE for `sde_class` or its nearest base class."""
    for cls in sde_class.__mro__:
        if cls in AUTO_TABLE:
            return AUTO_TABLE[cls]
    raise ValueError(f"no automatic parameterization for {sde_class.__name__}: choose one of "
                     f"{sorted(PARAMETERIZATIONS)} (model.parameterization, or get_score_fn(..., parameterization=))")


def _auto_names(sde_class: Type[SDE], continuous: bool, name: str, conditioning: str) -> Tuple[str, str]:
    """name and conditioning with "auto" replaced by AUTO_TABLE's choice (conditioning only for continuous time;
    a conditioning left "auto" is the parameterization's default, or "step" for a discrete-time network)."""
    if name == AUTO:
        name, auto_conditioning = auto_choice(sde_class)
        if conditioning == AUTO and continuous:
            conditioning = auto_conditioning
    return name, conditioning


def resolve(sde: SDE, continuous: bool = True, name: str = AUTO, conditioning: str = AUTO,
            sigma_data: float = EDM_SIGMA_DATA) -> Parameterization:
    """The parameterization `name` (a key of PARAMETERIZATIONS, or "auto": AUTO_TABLE) for `sde`."""
    name, conditioning = _auto_names(type(sde), continuous, name, conditioning)
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {name!r}; available: {sorted(PARAMETERIZATIONS)} or 'auto'")
    return PARAMETERIZATIONS[name](sde, continuous=continuous, conditioning=conditioning, sigma_data=sigma_data)


def _config_names(config, sde_type: Type[SDE]) -> Tuple[str, str]:
    """config.model's parameterization and conditioning; "auto" of a distilled student (distill.method) is its
    method's (students.DISTILL_METHODS) with the conditioning "auto" gives `sde_type`, as its teacher's."""
    m = config.model
    name, conditioning = m.parameterization, m.noise_conditioning
    method = student_method(config)
    student = None if method is None else DISTILL_METHODS[method][0]
    if name == AUTO and student is not None:
        name = student
        if conditioning == AUTO:
            conditioning = _auto_names(sde_type, config.training.continuous, AUTO, AUTO)[1]
    return name, conditioning


def from_config(config, sde: SDE) -> Parameterization:
    """The parameterization of config.model (parameterization, noise_conditioning, sigma_data) for `sde`, with
    training.continuous deciding between a continuous- and a discrete-time network."""
    m = config.model
    return resolve(sde, config.training.continuous, *_config_names(config, type(sde)), m.sigma_data)


def resolved_names(config) -> Tuple[str, str]:
    """(parameterization, conditioning) that config.model's keys mean for config.training.sde."""
    continuous, sde_type = config.training.continuous, sde_class(config.training.sde)
    name, conditioning = _auto_names(sde_type, continuous, *_config_names(config, sde_type))
    if conditioning == AUTO:
        conditioning = PARAMETERIZATIONS[name].default_conditioning if continuous else "step"
    return name, conditioning


def check_config(config) -> None:
    """model.parameterization, model.noise_conditioning, model.sigma_data, model.scale_by_sigma, and discrete-time
    training (training.continuous=False needs the SDE's chain). Raises ConfigError naming the key."""
    m, t = config.model, config.training
    choice("model.parameterization", m.parameterization, [*PARAMETERIZATIONS, AUTO])
    if m.noise_conditioning != AUTO and m.noise_conditioning not in CONDITIONINGS:
        raise ConfigError(f"model.noise_conditioning={m.noise_conditioning!r} is not one of "
                          f"{sorted(CONDITIONINGS) + [AUTO]}")
    if not m.sigma_data > 0:
        raise ConfigError(f"model.sigma_data must be > 0, got {m.sigma_data}")
    sde_type = sde_class(t.sde)
    if sde_type is None:
        return  # sdes.check_config names the unknown training.sde
    has_chain = discrete.chain_class(sde_type) is not None
    if not t.continuous and not has_chain:
        raise ConfigError(f"training.sde={t.sde!r} has no discrete chain, so training.continuous=False (DDPM/SMLD "
                          "loss) is impossible: set training.continuous=True")
    try:
        name, conditioning = resolved_names(config)
    except ValueError as err:
        raise ConfigError(f"model.parameterization={m.parameterization!r}: {err}") from None
    if conditioning == "step" and not has_chain:
        raise ConfigError(f"model.noise_conditioning='step' labels the levels of a discrete chain, and "
                          f"training.sde={t.sde!r} has none: use time, sigma or log_sigma")
    if name == "score_table" and not issubclass(sde_type, VESDE):
        raise ConfigError(f"model.parameterization='score_table' indexes the SMLD levels of training.sde='vesde', "
                          f"not {t.sde!r}")
    if m.zero_terminal_snr and name not in ("v", "velocity"):
        raise ConfigError(f"model.zero_terminal_snr=True makes α(T) = 0, where x_T is pure noise: a {name!r} network "
                          "cannot tell x̂₀ there (ε̂ = x_T carries nothing of it), so set model.parameterization='v' "
                          "(or 'velocity')")
    if m.scale_by_sigma and name not in SCALED_BY_SIGMA:
        raise ConfigError(f"model.scale_by_sigma=True means the network output divided by σ is the score, which is "
                          f"the 'score' parameterization; model.parameterization={m.parameterization!r} resolves to "
                          f"{name!r} for training.sde={t.sde!r}: set model.scale_by_sigma=False")


def noise_condition(sde: SDE, t: Tensor) -> Tensor:
    """The continuous-time noise conditioning AUTO_TABLE gives `sde` (999·t for VP/sub-VP, σ(t) for VE), (batch,)."""
    return resolve(sde).condition(t)


def as_parameterization(sde: SDE, continuous: bool,
                        parameterization: Union[None, str, Parameterization]) -> Parameterization:
    """A Parameterization from None ("auto"), a name, or an instance (whose SDE and time kind must match)."""
    if isinstance(parameterization, Parameterization):
        if parameterization.continuous != continuous:
            raise ValueError(f"{parameterization!r} was built with continuous={parameterization.continuous}, but "
                             f"continuous={continuous} was asked for")
        return parameterization
    return resolve(sde, continuous, AUTO if parameterization is None else parameterization)


__all__ = ["AUTO", "AUTO_TABLE", "CONDITIONINGS", "DDPM_TIME_SCALE", "EDM_SIGMA_DATA", "PARAMETERIZATIONS",
           "Parameterization", "EpsPrediction", "ScaledScorePrediction", "LevelTableScorePrediction", "DataPrediction",
           "EDMPreconditioning", "ConsistencyParameterization", "edm_coefficients", "consistency_coefficients", "register_parameterization", "resolve", "from_config", "check_config",
           "noise_condition", "as_parameterization"]
