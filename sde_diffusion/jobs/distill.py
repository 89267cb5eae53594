"""--mode distill: a few-step student of a trained teacher (sde_diffusion/distillation.py), trained in its own
workdir by --mode train's machinery (EMA, checkpoints with sidecars, resume, torchrun, bf16, compile, the lock);
its checkpoints are evaluated, sampled and compared like any other.

The teacher (distill.teacher_workdir) is read before any compute: its config (config.json, or config.py for a
converted model), its numbered checkpoint's EMA weights, and the checks that the student can start from them (the
same data, SDE and network). The student's network starts from those weights.

* consistency: consistency distillation on distill.levels levels drawn as distill.level_sampling says, the
  teacher's ODE stepped by distill.solver, the target an EMA of the student (distill.target_ema).
* consistency_training: iCT's recipe (levels doubling from 10 to 1280, log-normal level draws, 1/Δs weights,
  pseudo-Huber) from the teacher's weights, without calling the teacher.
* progressive: rounds halving distill.teacher_steps down to distill.steps; each round's teacher is the previous
  round's student (its EMA weights), and the step budget training.n_iters is split evenly over the rounds.
"""
from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional

import torch
from torch import nn

from .. import distillation, parameterization
from ..checkpoints import load_checkpoint
from ..errors import CheckpointError, ConfigError
from ..sdes import SDE, ScoreFn
from ..validation import validate_config
from . import builder, train
from .sources import DATA_AND_SDE_KEYS, ModelSource, config_value, differing, overrides, read_source

log = logging.getLogger("sde_diffusion")

# Keys a student may set apart from its teacher: what its network predicts and is fed, and how it is trained.
FREE_MODEL_KEYS = ("parameterization", "noise_conditioning", "ema_rate", "dropout")
# Keys of the data and the SDE that the student must share with its teacher.
SHARED_KEYS = DATA_AND_SDE_KEYS
TeacherSource = ModelSource  # where the teacher comes from: its workdir, its config and the checkpoint read


def find_teacher(config) -> TeacherSource:
    """Read and check the teacher before any compute; ConfigError or CheckpointError naming what to fix."""
    d = config.distill
    if d.method is None:
        raise ConfigError("--mode distill needs distill.method (consistency, consistency_training or progressive) and "
                          "distill.teacher_workdir, e.g. --config configs/cd_digits.py")
    if d.teacher_workdir is None:
        raise ConfigError("--mode distill needs distill.teacher_workdir: the workdir of a trained model (--mode train)")
    source = read_source(Path(d.teacher_workdir), d.teacher_checkpoint, "distill.teacher_workdir",
                         "distill.teacher_checkpoint", "teacher")
    check_student_fits_teacher(config, source.config, source.workdir)
    return source


def check_student_fits_teacher(config, teacher, folder: Path) -> None:
    """Same data, SDE and network (the student starts from the teacher's weights); a consistency student keeps the
    teacher's noise conditioning, a progressive one also its parameterization."""
    differ = differing(config, teacher, SHARED_KEYS)
    if differ:
        shown = ", ".join(f"{key}={config_value(teacher, key)!r} (student: {config_value(config, key)!r})"
                          for key in differ)
        raise ConfigError(f"the teacher in {folder} has {shown}: a student learns the teacher's data and process, so "
                          f"set them as the teacher's: {overrides(teacher, differ)}")
    network = [f"model.{key}" for key in teacher.model if key not in FREE_MODEL_KEYS + ("text", "autoencoder")
               and teacher.model[key] != config.model[key]]
    network += [f"model.text.{key}" for key in teacher.model.text if teacher.model.text[key] != config.model.text[key]]
    if network:
        raise ConfigError(f"the student's network must be the teacher's (it starts from the teacher's weights in "
                          f"{folder}); these keys differ: {', '.join(network)}. Set them as the teacher's: "
                          f"{overrides(teacher, network)}")
    if teacher.model.latent and config.model.autoencoder.pretrained is None:
        first_stage = teacher.model.autoencoder.pretrained or str(folder / "autoencoder" / "autoencoder.pth")
        raise ConfigError(f"the teacher in {folder} is a latent model: the student needs its first stage, so set "
                          f"--config.model.autoencoder.pretrained={first_stage}")
    if not teacher.training.continuous:
        raise ConfigError(f"the teacher in {folder} is a discrete-time network (training.continuous=False): the "
                          f"distillation methods evaluate it at any time of the ODE")
    mine, theirs = parameterization.resolved_names(config), parameterization.resolved_names(teacher)
    if mine[1] != theirs[1]:
        raise ConfigError(f"the teacher's network is conditioned on {theirs[1]!r} and the student's on {mine[1]!r}: "
                          f"set model.noise_conditioning={theirs[1]!r}")
    if config.distill.method == "progressive" and mine[0] != theirs[0]:
        raise ConfigError(f"progressive distillation keeps what the network predicts: the teacher predicts "
                          f"{theirs[0]!r} and the student {mine[0]!r}; set model.parameterization={theirs[0]!r} "
                          "(or 'auto' when that is the SDE's own)")


class Scores(NamedTuple):
    """The score functions a distillation loss calls for one batch's labels: the student's (trained), the
    teacher's (frozen; None when the method calls no teacher) and the consistency target's (an EMA of the student;
    None: the student itself)."""

    student: ScoreFn
    teacher: Optional[ScoreFn]
    target: Optional[ScoreFn] = None


class Student:
    """The distillation of one run: the teacher's network, the loss `TrainStep` calls with `Scores`, the round of
    progressive distillation; its state_dict goes into every checkpoint (TrainState.student)."""

    def __init__(self, config, source: TeacherSource, sde: SDE):
        self.config, self.source, self.sde, self.method = config, source, sde, config.distill.method
        self.teacher: Optional[nn.Module] = None
        self.teacher_score_for: Optional[Callable] = None
        self.target: Optional[nn.Module] = None  # consistency distillation's EMA target (distill.target_ema > 0)
        self.target_score_for: Optional[Callable] = None
        self.step = 0
        d, s = config.distill, config.sampling
        self.levels = distillation.karras_times(sde, d.levels)
        self.level_probabilities = distillation.ict_level_probabilities(sde, self.levels)
        self.rounds = distillation.progressive_rounds(d.teacher_steps, d.steps) if self.method == "progressive" \
            else []
        self.round = 0
        self.round_iters = config.training.n_iters // max(len(self.rounds), 1)
        self.grids = [distillation.progressive_grid(sde, 2 * n, s.rho, s.eps) for n in self.rounds]

    # --- weights -------------------------------------------------------------------------------------------
    def initialize(self, model: nn.Module) -> None:
        """The teacher's EMA weights into the student `model` (before its optimizer and EMA are made), and a
        frozen copy as the teacher when the method calls one."""
        checkpoint = load_checkpoint(self.source.checkpoint, "cpu")
        builder.check_recorded_parts(checkpoint, self.source.checkpoint, builder.recorded_parts(self.source.config))
        try:
            teacher = copy.deepcopy(model)
            teacher.load_state_dict(checkpoint["model"], strict=True)
            ema = builder.make_ema(self.source.config, teacher)
            ema.load_state_dict(checkpoint["ema"])
            ema.copy_to(teacher.parameters())
            model.load_state_dict(teacher.state_dict(), strict=True)
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{self.source.checkpoint} does not fit the student's network: {err}") from err
        log.info("student initialized from the EMA weights of %s (step %s)", self.source.checkpoint,
                 checkpoint.get("step"))
        if self.method != "consistency_training":
            self._set_teacher(teacher)
        if self.method == "consistency" and self.config.distill.target_ema > 0:
            self.target = copy.deepcopy(model).eval().requires_grad_(False)
            self.target_score_for = builder.labelled_score_fn(self.config, self.sde, self.target)

    def _set_teacher(self, teacher: nn.Module) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_score_for = builder.labelled_score_fn(self.source.config, self.sde, self.teacher)

    def paired(self, student_for: Callable) -> Callable:
        """labels ↦ Scores(student's, teacher's) from the student's labels ↦ score function."""
        def scores_for(labels):
            teacher = None if self.teacher_score_for is None else self.teacher_score_for(labels)
            target = None if self.target_score_for is None else self.target_score_for(labels)
            return Scores(student_for(labels), teacher, target)
        return scores_for

    def before_step(self, step: int, model: nn.Module, ema) -> None:
        """The consistency target moves toward the student's weights of the step before (target_ema); progressive
        distillation's next round begins: the student's EMA weights become the student and its teacher."""
        self.step = step
        if self.target is not None and step > 1:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.target.parameters()), list(model.parameters()),
                                     1.0 - self.config.distill.target_ema)
        if not self.rounds:
            return
        r = min((step - 1) // self.round_iters, len(self.rounds) - 1)
        if r > self.round:
            ema.copy_to(model.parameters())
            self._set_teacher(copy.deepcopy(model))
            self.round = r
            log.info("progressive distillation round %d of %d: %d → %d steps", r + 1, len(self.rounds),
                     2 * self.rounds[r], self.rounds[r])

    # --- the loss ------------------------------------------------------------------------------------------
    def loss_fn(self, scores: Scores, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
                shard=(0, 1)) -> torch.Tensor:
        d = self.config.distill
        if self.method == "progressive":
            return distillation.progressive_loss(scores.student, scores.teacher, self.sde, x0,
                                                 self.grids[self.round], generator, shard)
        student = distillation.consistency_fn(scores.student, self.sde)
        if self.method == "consistency":
            target = None if scores.target is None else distillation.consistency_fn(scores.target, self.sde)
            lognormal = d.level_sampling == "lognormal"
            return distillation.consistency_loss(student, self.sde, x0, self.levels, generator, teacher=scores.teacher,
                                                 target=target, solver=d.solver, huber_c=d.huber_c, shard=shard,
                                                 level_probabilities=self.level_probabilities if lognormal else None,
                                                 weighted=lognormal)
        levels, probabilities = self.ict_levels(distillation.ict_level_count(max(self.step - 1, 0),
                                                                             self.config.training.n_iters))
        return distillation.consistency_loss(student, self.sde, x0, levels, generator, weighted=True,
                                             level_probabilities=probabilities, huber_c=d.huber_c, shard=shard)

    @functools.lru_cache(maxsize=None)
    def ict_levels(self, count: int):
        """iCT's `count` levels and their probabilities (the curriculum has a handful of counts: built once each)."""
        levels = distillation.karras_times(self.sde, count)
        return levels, distillation.ict_level_probabilities(self.sde, levels)

    # --- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        teacher = self.teacher.state_dict() if self.rounds and self.round > 0 else None
        return {"method": self.method, "round": self.round, "teacher": teacher,
                "target": None if self.target is None else self.target.state_dict(),
                "teacher_checkpoint": str(self.source.checkpoint)}

    def load_state_dict(self, state: Dict[str, Any], path) -> None:
        if state.get("method") != self.method:
            raise CheckpointError(f"{path} is a {state.get('method')!r} student and the config says "
                                  f"distill.method={self.method!r}: use another workdir, or the method it was "
                                  "trained with")
        self.round = int(state["round"])
        if (state.get("target") is None) != (self.target is None):
            raise CheckpointError(f"{path} was distilled with{'out' if state.get('target') is None else ''} an EMA "
                                  f"target and the config sets distill.target_ema={self.config.distill.target_ema}: "
                                  "resume with the value it was trained with")
        if self.target is not None:
            self.target.load_state_dict(state["target"], strict=True)
        if state.get("teacher") is not None:
            teacher = copy.deepcopy(self.teacher)
            teacher.load_state_dict(state["teacher"], strict=True)
            self._set_teacher(teacher)


def run(config, workdir):
    """Distill, resuming from the newest good checkpoint in workdir/checkpoints-meta; returns the final state."""
    validate_config(config)
    source = find_teacher(config)
    with builder.distributed_job(config) as (world, device), builder.training_lock(workdir, "distill", world):
        return train.train(train.setup(config, Path(workdir), world, device,
                                       make_student=lambda sde: Student(config, source, sde)))
