"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", §3 and
appendix C): choose the EMA length after training.

A power-function EMA with exponent γ averages the weights θ(τ) of steps τ ≤ t with density

    p_{γ,t}(τ) = (γ + 1) τ^γ / t^(γ+1),   0 < τ ≤ t,

tracked step by step as θ̂ ← β θ̂ + (1 − β) θ with β(t) = (1 − 1/t)^(γ+1). Its width relative to t is

    σ_rel = √[(γ + 1) / ((γ + 2)² (γ + 3))],

at most `SIGMA_REL_MAX` ≈ 0.3003 (at γ = (√5 − 3)/2); the larger root γ of the cubic is the one used. Training tracks
a few profiles (training.post_hoc_ema) and stores them every training.post_hoc_ema_freq steps into
workdir/post_hoc_ema/. Since each snapshot is a known average of the weight trajectory, the EMA of any other
(σ_rel, t) is approximately a linear combination of snapshots: the coefficients x solve the least-squares problem
min ‖p_target − Σ x_i p_i‖² over the profiles' densities, A x = b with A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_target⟩.
`reconstruct` applies them to the stored weights.

Storage: one file per snapshot, phema_<step>.pth, holding every profile's trainable parameters:
(number of profiles) × (trainable parameters) × 4 bytes (2 with training.post_hoc_ema_precision 'fp16'/'bf16').
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .checkpoints import digest_path, load_checkpoint, save_checkpoint
from .errors import CheckpointError, ConfigError, CorruptCheckpointError

log = logging.getLogger("sde_diffusion")

FOLDER = "post_hoc_ema"  # workdir/post_hoc_ema/phema_<step>.pth
GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0  # the γ where σ_rel(γ) peaks
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# A reconstruction is refused when its density differs from the target's by more than this fraction (L2 norm):
# farther than that the snapshots do not hold the average asked for.
MAX_PROFILE_ERROR = 0.05
_NAME = re.compile(r"^phema_(\d+)\.pth$")


def sigma_rel_of_gamma(gamma: float) -> float:
    """σ_rel of the power-function profile with exponent γ > −1."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


SIGMA_REL_MAX = sigma_rel_of_gamma(GAMMA_AT_MAX)


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent γ of σ_rel ∈ (0, SIGMA_REL_MAX): the larger root of (γ+2)²(γ+3) = σ_rel⁻²(γ+1), i.e.
    γ³ + 7γ² + (16 − σ_rel⁻²)γ + 12 − σ_rel⁻² = 0."""
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"σ_rel={sigma_rel} is outside (0, {SIGMA_REL_MAX:.4f}), the range of power-function EMA "
                         "profiles (σ_rel → 0: no averaging; the widest profile has σ_rel ≈ 0.3003)")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))))


def ema_beta(step: int, gamma: float) -> float:
    """β(t) = (1 − 1/t)^(γ+1): the weight of the previous average after step t ≥ 1 (β(1) = 0)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


# --------------------------------------------------------------------------------------------------
# Tracking during training
# --------------------------------------------------------------------------------------------------
class PowerEMA:
    """The power-function EMA profiles of `sigma_rels` over a model's trainable parameters.

    `update(parameters, step)` after each optimizer step t = 1, 2, … (one fused lerp per profile, no host
    synchronisation); `snapshot(step, dtype)` is what `save_snapshot` writes. A skipped step updates too: its
    weights are the previous step's, which is what the profile's density over steps assumes.
    """

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_of_sigma_rel(s) for s in self.sigma_rels]
        self.model = model
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.profiles: List[List[torch.Tensor]] = [
            [p.detach().clone() for p in model.parameters() if p.requires_grad] for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, parameters: Iterable[nn.Parameter], step: int) -> None:
        params = [p.detach() for p in parameters if p.requires_grad]
        for profile, gamma in zip(self.profiles, self.gammas):
            torch._foreach_lerp_(profile, params, 1.0 - ema_beta(step, gamma))

    def snapshot(self, step: int, dtype: torch.dtype = torch.float32) -> Dict:
        """Every profile as one flat tensor (names and shapes say how to cut it), on the CPU in `dtype`, and the
        model's state that is not averaged (buffers, frozen parameters) as it is now."""
        shapes = [list(t.shape) for t in self.profiles[0]] if self.profiles else []
        fixed = {k: v.detach().to("cpu") for k, v in self.model.state_dict().items() if k not in set(self.names)}
        return {"step": step, "sigma_rels": self.sigma_rels, "gammas": self.gammas, "names": self.names,
                "shapes": shapes, "fixed": fixed,
                "profiles": [torch.cat([t.detach().reshape(-1).to("cpu", dtype) for t in profile])
                             for profile in self.profiles]}

    def state_dict(self) -> Dict:
        return {"sigma_rels": self.sigma_rels, "profiles": self.profiles}

    def load_state_dict(self, state: Dict, path="checkpoint") -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise CheckpointError(f"{path} tracked post-hoc EMA profiles σ_rel = {tuple(state['sigma_rels'])}, the "
                                  f"config asks for training.post_hoc_ema = {tuple(self.sigma_rels)}: profiles "
                                  "average the whole run, so set training.post_hoc_ema as when it started")
        for mine, saved in zip(self.profiles, state["profiles"]):
            if len(mine) != len(saved):
                raise CheckpointError(f"{path}: its post-hoc EMA profiles do not fit the model built from this config")
            with torch.no_grad():
                torch._foreach_copy_(mine, [s.to(m.device, m.dtype) for m, s in zip(mine, saved)])


def snapshot_path(workdir, step: int) -> Path:
    return Path(workdir) / FOLDER / f"phema_{step}.pth"


def save_snapshot(workdir, tracker: PowerEMA, step: int, precision: str = "fp32") -> Path:
    """Write every profile at `step` to workdir/post_hoc_ema/phema_<step>.pth (atomically, with a .sha256)."""
    path = snapshot_path(workdir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, tracker.snapshot(step, PRECISIONS[precision]))
    return path


def snapshot_steps(workdir) -> List[Tuple[int, Path]]:
    """(step, path) of the stored snapshots, oldest first."""
    folder = Path(workdir) / FOLDER
    found = [(int(m.group(1)), p) for p in folder.glob("phema_*.pth") if (m := _NAME.match(p.name))]
    return sorted(found)


def discard_after(workdir, step: int) -> List[Path]:
    """Delete the snapshots (and sidecars) of steps after `step`; returns the deleted files."""
    gone = []
    for s, path in snapshot_steps(workdir):
        if s > step:
            path.unlink(missing_ok=True)
            digest_path(path).unlink(missing_ok=True)
            gone.append(path)
    return gone


# --------------------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------------------
def _log_inner(g1: np.ndarray, t1: np.ndarray, g2: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """log ⟨p_{γ1,t1}, p_{γ2,t2}⟩ = log ∫_0^min(t1,t2) p_{γ1,t1} p_{γ2,t2} dτ (broadcast), in float64."""
    m = np.minimum(t1, t2)
    return (np.log(g1 + 1) + np.log(g2 + 1) - (g1 + 1) * np.log(t1) - (g2 + 1) * np.log(t2)
            + (g1 + g2 + 1) * np.log(m) - np.log(g1 + g2 + 1))


def solve_coefficients(gammas: Sequence[float], steps: Sequence[float], gamma: float, step: float
                       ) -> Tuple[np.ndarray, float]:
    """Least-squares coefficients x of the snapshots (γ_i, t_i) for the profile (γ, t), and the relative L2 error
    ‖p − Σ x_i p_i‖ / ‖p‖ of the reconstructed density."""
    g, t = np.asarray(gammas, np.float64), np.asarray(steps, np.float64)
    A = np.exp(_log_inner(g[:, None], t[:, None], g[None, :], t[None, :]))
    b = np.exp(_log_inner(g, t, np.float64(gamma), np.float64(step)))
    norm2 = float(np.exp(_log_inner(np.float64(gamma), np.float64(step), np.float64(gamma), np.float64(step))))
    # scale rows and columns to a unit diagonal before solving: the Gram matrix's entries span orders of magnitude
    d = 1.0 / np.sqrt(np.diag(A))
    y, *_ = np.linalg.lstsq(A * d[:, None] * d[None, :], b * d, rcond=None)
    x = y * d
    residual2 = norm2 - 2.0 * float(x @ b) + float(x @ A @ x)
    return x, math.sqrt(max(residual2, 0.0) / norm2)


@dataclass
class Snapshot:
    step: int
    path: Path
    index: int  # which profile of the file
    gamma: float
    sigma_rel: float


def _readable(workdir, step: Optional[int]) -> Tuple[List[Snapshot], List[str], Dict]:
    """The profiles stored at steps ≤ `step` (all with None), the snapshot files that failed to verify, and the
    layout (names, shapes, the state that is not averaged) of the newest. Each file is verified here; its tensors
    are memory-mapped, not read. CheckpointError when two files disagree on the layout."""
    found, corrupt, layout = [], [], {}
    for s, path in snapshot_steps(workdir):
        if step is not None and s > step:
            continue
        try:
            meta = load_checkpoint(path, mmap=True)
        except (CorruptCheckpointError, CheckpointError) as err:
            log.warning("post-hoc EMA snapshot %s is skipped: %s", path, err)
            corrupt.append(path.name)
            continue
        if layout and (meta["names"], meta["shapes"]) != (layout["names"], layout["shapes"]):
            raise CheckpointError(f"{path} holds other parameters than the earlier snapshots of "
                                  f"{Path(workdir) / FOLDER}: snapshots of another model are mixed in; move them away")
        layout = {"names": meta["names"], "shapes": meta["shapes"], "fixed": meta["fixed"]}
        for i, (g, sr) in enumerate(zip(meta["gammas"], meta["sigma_rels"])):
            found.append(Snapshot(s, path, i, float(g), float(sr)))
    return found, corrupt, layout


@dataclass
class Reconstruction:
    """What `reconstruct` built: the state dict, and where it came from (for reports)."""

    state_dict: Dict[str, torch.Tensor]
    sigma_rel: float
    step: int
    snapshots: List[str]  # files used
    profile_error: float  # relative L2 error of the reconstructed averaging density
    skipped: List[str]  # corrupt files left out

    def report(self) -> Dict:
        return {"sigma_rel": self.sigma_rel, "step": self.step, "snapshots": self.snapshots,
                "profile_error": self.profile_error, "skipped_corrupt": self.skipped}


def require_snapshots(workdir, asked_by: str = "eval.ema_sigma_rel") -> None:
    """CheckpointError naming the keys to set when workdir/post_hoc_ema/ holds no snapshot."""
    if not snapshot_steps(workdir):
        regular = ", or set eval.ema_sigma_rel = 0 for the regular EMA" if asked_by == "eval.ema_sigma_rel" else ""
        raise CheckpointError(f"{Path(workdir) / FOLDER} holds no post-hoc EMA snapshots, which {asked_by} needs: "
                              "train with training.post_hoc_ema = (σ_rel, ...) (e.g. (0.05, 0.10)) and "
                              f"training.post_hoc_ema_freq{regular}")


@dataclass
class Plan:
    """The verified snapshots at steps ≤ `step` and, per σ_rel asked for, the least-squares coefficients of their
    profiles and the relative error of the reconstructed density (`plan`; `Plan.build` applies them)."""

    workdir: Path
    step: int
    snapshots: List[Snapshot]
    corrupt: List[str]
    layout: Dict
    solutions: Dict[float, Tuple[np.ndarray, float]]

    def build(self, sigma_rel: float) -> Reconstruction:
        """The state dict of one planned σ_rel: Σ x_i θ_i over the snapshot files (float64 sums, read one file at
        a time), with the newest file's buffers."""
        x, error = self.solutions[float(sigma_rel)]
        total = None
        for path in sorted({s.path for s in self.snapshots}):  # verified by `plan`
            profiles = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["profiles"]
            for coefficient, snap in zip(x, self.snapshots):
                if snap.path == path:
                    term = profiles[snap.index].double() * float(coefficient)
                    total = term if total is None else total.add_(term)
        shapes = self.layout["shapes"]
        pieces = total.float().split([math.prod(shape) for shape in shapes])
        state = {**{k: v.clone() for k, v in self.layout["fixed"].items()},
                 **{name: piece.reshape(shape) for name, piece, shape in zip(self.layout["names"], pieces, shapes)}}
        return Reconstruction(state, float(sigma_rel), self.step, sorted({s.path.name for s in self.snapshots}),
                              error, self.corrupt)


def plan(workdir, sigma_rels: Sequence[float], step: Optional[int] = None) -> Plan:
    """Verify the snapshots once and solve for every σ_rel; ValueError for a σ_rel out of range, CheckpointError
    when there are no snapshots or they cannot represent one of them (density error over MAX_PROFILE_ERROR)."""
    gammas = {float(s): gamma_of_sigma_rel(float(s)) for s in sigma_rels}
    folder = Path(workdir) / FOLDER
    require_snapshots(workdir)
    snaps, corrupt, layout = _readable(workdir, step)
    target = step if step is not None else max((s.step for s in snaps), default=0)
    if not snaps:
        raise CheckpointError(f"{folder} has no readable snapshot at step ≤ {target}"
                              + (f" ({len(corrupt)} corrupt: {', '.join(corrupt)})" if corrupt else ""))
    solutions = {}
    for sigma_rel, gamma in gammas.items():
        x, error = solve_coefficients([s.gamma for s in snaps], [s.step for s in snaps], gamma, target)
        if error > MAX_PROFILE_ERROR:
            tracked = sorted({s.sigma_rel for s in snaps})
            raise CheckpointError(
                f"the snapshots in {folder} cannot represent σ_rel = {sigma_rel:g} at step {target}: the best "
                f"combination of {len(snaps)} profiles (σ_rel {', '.join(f'{s:g}' for s in tracked)}, steps "
                f"{snaps[0].step}…{snaps[-1].step}) misses its averaging density by {error:.1%} (limit "
                f"{MAX_PROFILE_ERROR:.0%})" + (f", with the corrupt {', '.join(corrupt)} left out" if corrupt else "")
                + ": ask for a σ_rel nearer the tracked ones, or track profiles nearer it and snapshot more often "
                "(training.post_hoc_ema, training.post_hoc_ema_freq)")
        solutions[sigma_rel] = (x, error)
    return Plan(Path(workdir), int(target), snaps, corrupt, layout, solutions)


def reconstruct(workdir, sigma_rel: float, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The model's state dict with its trainable parameters averaged by the power-function EMA of `sigma_rel` at
    `step` (None: the newest readable snapshot's step), from the snapshots in workdir/post_hoc_ema/ at steps ≤ step
    (float32, on the CPU; buffers as the newest of them holds them), for `model.load_state_dict`. ValueError when
    σ_rel is out of range; CheckpointError when there are no snapshots or they cannot represent it. `reconstruction`
    gives the provenance too."""
    return reconstruction(workdir, sigma_rel, step).state_dict


def reconstruction(workdir, sigma_rel: float, step: Optional[int] = None) -> Reconstruction:
    """`reconstruct` with its provenance: the files used, the density's relative error and the skipped files."""
    return plan(workdir, [sigma_rel], step).build(sigma_rel)


def load_into(model: nn.Module, state: Dict[str, torch.Tensor], source="the reconstruction") -> None:
    """model.load_state_dict(state) (strict), CheckpointError naming `source` when it does not fit."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{source} does not fit the model built from this config: {err}") from err


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
def check_config(config) -> None:
    """training.post_hoc_ema (each σ_rel in range, distinct), its frequency (at least as many snapshots as profiles)
    and precision, eval.ema_sigma_rel and eval.ema_sweep. Raises ConfigError naming the key."""
    t, e = config.training, config.eval
    profiles = tuple(t.post_hoc_ema)
    for key, values in (("training.post_hoc_ema", profiles), ("eval.ema_sweep", tuple(e.ema_sweep))):
        for value in values:
            if not isinstance(value, (int, float)) or not 0.0 < value < SIGMA_REL_MAX:
                raise ConfigError(f"{key} = {values}: {value!r} is not a σ_rel in (0, {SIGMA_REL_MAX:.4f}), the "
                                  "range of power-function EMA profiles (EDM2 tracks (0.05, 0.10))")
    if len(set(profiles)) != len(profiles):
        raise ConfigError(f"training.post_hoc_ema = {profiles} names a profile twice")
    if t.post_hoc_ema_precision not in PRECISIONS:
        raise ConfigError(f"training.post_hoc_ema_precision={t.post_hoc_ema_precision!r} is not one of "
                          f"{sorted(PRECISIONS)}")
    if profiles:
        if t.post_hoc_ema_freq <= 0:
            raise ConfigError(f"training.post_hoc_ema_freq must be > 0, got {t.post_hoc_ema_freq}")
        snapshots = t.n_iters // t.post_hoc_ema_freq
        if snapshots < len(profiles):
            raise ConfigError(f"training.post_hoc_ema_freq={t.post_hoc_ema_freq} leaves {snapshots} snapshot(s) in "
                              f"training.n_iters={t.n_iters} steps, fewer than the {len(profiles)} profiles: the "
                              "reconstruction needs many snapshots (EDM2 keeps hundreds); lower the frequency")
    sigma = e.ema_sigma_rel
    if not isinstance(sigma, (int, float)) or not 0.0 <= sigma < SIGMA_REL_MAX:
        raise ConfigError(f"eval.ema_sigma_rel={sigma!r} must be 0 (the regular EMA) or a σ_rel in "
                          f"(0, {SIGMA_REL_MAX:.4f})")
