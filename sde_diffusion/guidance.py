"""Class-conditional generation by guidance: new score functions built from old ones, so every sampler uses them.

    classifier-free (Ho & Salimans 2022):  s_w(x, t, y) = (1 + w)·s(x, t, y) − w·s(x, t)
    classifier (Dhariwal & Nichol 2021):   s_c(x, t, y) = s(x, t) + scale·∇ₓ log p_t(y | x)

With exact scores, w = 0 and scale = 1 both give ∇ log p_t(x | y) (Bayes: log p_t(x|y) = log p_t(x) +
log p_t(y|x) − log p(y)), so a sampler then draws from p(x | y); w > 0 or scale > 1 sharpen toward samples the
class explains best. The two agree exactly when scale = 1 + w: s_w = s(x, t) + (1 + w)·∇ log p_t(y | x).

A class-conditional network learns s(x, t) as well when its labels are replaced by the null label with probability
`training.label_dropout` (`drop_labels`); `guided_score_fn` turns such a network (and optionally a noise-conditional
classifier's gradient, see classifier.py) into one guided score function.

Two refinements, also compositions of score functions:

    autoguidance (Karras et al. 2024):      s_w(x, t) = (1 + w)·s_main(x, t, y) − w·s_guide(x, t, y)
    guidance interval (Kynkäänniemi et al. 2024):  s_w where σ_lo ≤ σ(t)/α(t) ≤ σ_hi, s(x, t, y) elsewhere

Autoguidance's guide is a weaker model of the same task and conditioning (an earlier checkpoint, a smaller
network), so it needs neither label dropout nor a conditional model; in the denoiser frame it is Karras et al.'s
D_guide + (1 + w)·(D_main − D_guide), since D is affine in the score with the same coefficients for both. The
interval is in the EDM frame's noise level σ(t)/α(t) (the std of the noise of x_t/α(t)), which does not depend on
the SDE: VP, VE, EDM and rectified flow with the same level apply guidance at the same signal-to-noise ratio.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .errors import ConfigError
from .models.score_fn import Labels, batch_labels, get_score_fn, is_conditional, null_condition
from .sdes import SDE, ScoreFn, batch_time, per_sample

GradLogPy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """(1 + w)·s(x, t, y) − w·s(x, t) for two scores like x."""
    return (1 + w) * cond - w * uncond


def classifier_free(cond_score_fn: ScoreFn, uncond_score_fn: ScoreFn, w: float) -> ScoreFn:
    """Classifier-free guidance: score_fn(x, t) = (1 + w)·cond_score_fn(x, t) − w·uncond_score_fn(x, t)."""

    def score_fn(x: torch.Tensor, t) -> torch.Tensor:
        return cfg_combine(cond_score_fn(x, t), uncond_score_fn(x, t), w)

    return score_fn


def classifier(score_fn: ScoreFn, grad_log_p_y: GradLogPy, scale: float = 1.0) -> ScoreFn:
    """Classifier guidance: guided(x, t) = score_fn(x, t) + scale·grad_log_p_y(x, t), with grad_log_p_y(x, t) the
    gradient ∇ₓ log p_t(y | x) of a (noise-conditional) classifier for the wanted labels y, like x."""

    def guided(x: torch.Tensor, t) -> torch.Tensor:
        return score_fn(x, t) + scale * grad_log_p_y(x, t)

    return guided


def autoguidance(main_score_fn: ScoreFn, guide_score_fn: ScoreFn, w: float) -> ScoreFn:
    """Autoguidance: score_fn(x, t) = (1 + w)·main_score_fn(x, t) − w·guide_score_fn(x, t), the guide a weaker model
    of the same task and conditioning (w = 0: the main model; guide = main: the main model for every w)."""

    def score_fn(x: torch.Tensor, t) -> torch.Tensor:
        return cfg_combine(main_score_fn(x, t), guide_score_fn(x, t), w)

    return score_fn


def noise_level(sde: SDE, t) -> torch.Tensor:
    """The EDM-frame noise level σ(t)/α(t), float64, with t's shape and device (∞ where α(t) = 0)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return sde.sigma(t) / sde.alpha(t)


def check_interval(sigma_lo: float, sigma_hi: float) -> None:
    """0 ≤ σ_lo < σ_hi, else ValueError."""
    if not 0 <= sigma_lo < sigma_hi:
        raise ValueError(f"a guidance interval needs 0 ≤ σ_lo < σ_hi, got ({sigma_lo}, {sigma_hi})")


def interval(guided: ScoreFn, plain: ScoreFn, sde: SDE, sigma_lo: float, sigma_hi: float) -> ScoreFn:
    """Guidance in an interval of noise levels: guided(x, t) where σ_lo ≤ σ(t)/α(t) ≤ σ_hi, plain(x, t) elsewhere
    (per sample for times (batch,)). Each is called only when some sample needs it, so outside the interval a
    step costs the plain score alone (deciding reads the times: one small read when they live on a device)."""
    check_interval(sigma_lo, sigma_hi)

    def score_fn(x: torch.Tensor, t) -> torch.Tensor:
        level = noise_level(sde, t)
        inside = (level >= sigma_lo) & (level <= sigma_hi)
        if bool(inside.all()):
            return guided(x, t)
        if not bool(inside.any()):
            return plain(x, t)
        return torch.where(per_sample(inside.expand(x.shape[0]).to(x.device), x), guided(x, t), plain(x, t))

    return score_fn


def drop_labels(labels: torch.Tensor, p: float, null_label: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Replace each label by `null_label` with probability p (training for classifier-free guidance): (batch,)."""
    return drop_conditions(labels, p, torch.full_like(labels, null_label), generator)


def drop_conditions(conditions: torch.Tensor, p: float, null: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Replace each row of conditions (batch, ...) (labels, or caption token ids) by the same row of `null` with
    probability p."""
    if p == 0:
        return conditions
    dropped = torch.rand(conditions.shape[0], generator=generator, device=conditions.device) < p
    return torch.where(dropped.reshape(-1, *[1] * (conditions.ndim - 1)), null.to(conditions.device), conditions)


def paired_score_fn(sde: SDE, model: nn.Module, labels: Labels, continuous: bool = True, parameterization=None):
    """(x, t) ↦ (s(x, t, y), s(x, t)) of a class-conditional network in one forward pass over [x; x] with labels
    [y; null label] (one network call per guided score instead of two). parameterization: as in get_score_fn."""

    def pair(x: torch.Tensor, t):
        y = batch_labels(labels, x)
        both = torch.cat([y, null_condition(model, len(y), x.device)])
        score_fn = get_score_fn(sde, model, continuous, labels=both, parameterization=parameterization)
        scores = score_fn(torch.cat([x, x]), batch_time(t, x).repeat(2))
        return scores.chunk(2)

    return pair


def guided_score_fn(sde: SDE, model: nn.Module, labels: Optional[Labels] = None, *, guidance_scale: float = 0.0,
                    continuous: bool = True, grad_log_p_y: Optional[GradLogPy] = None,
                    classifier_scale: float = 0.0, parameterization=None, guide_score_fn: Optional[ScoreFn] = None,
                    guidance_interval: Optional[Tuple[float, float]] = None) -> ScoreFn:
    """The score function a sampler should follow for a network and wanted labels (config.sampling's guidance).

    labels: (batch,) or one int; None for unconditional sampling (a class-conditional network then gets its null
    label). guidance_scale: w of classifier-free guidance (needs a class-conditional network, labels, and training
    with label dropout), or of autoguidance when guide_score_fn (the guide's score for the same labels) is given.
    guidance_interval: (σ_lo, σ_hi), guidance only there (`interval`); elsewhere the network's own score.
    grad_log_p_y, classifier_scale: classifier guidance, added to the (guided) score.
    parameterization: the network's (see get_score_fn; None: the SDE's automatic one).
    """
    conditional = is_conditional(model)
    if guidance_scale and guide_score_fn is None and not (conditional and labels is not None):
        raise ValueError("classifier-free guidance (sampling.guidance_scale ≠ 0) needs a class- or text-conditional "
                         "network (model.num_classes > 0 or model.text.encoder) and labels or captions")
    if guidance_interval is not None and not guidance_scale:
        raise ValueError("a guidance interval (sampling.guidance_interval) needs guidance: sampling.guidance_scale > 0")
    if classifier_scale and grad_log_p_y is None:
        raise ValueError("classifier guidance (sampling.classifier_scale > 0) needs a classifier gradient")
    plain = get_score_fn(sde, model, continuous, labels=labels if conditional else None,
                         parameterization=parameterization)
    score_fn = plain
    if guidance_scale and guide_score_fn is not None:
        score_fn = autoguidance(plain, guide_score_fn, guidance_scale)
    elif guidance_scale:
        score_fn = paired_classifier_free(sde, model, labels, guidance_scale, continuous, parameterization)
    if guidance_interval is not None:
        score_fn = interval(score_fn, plain, sde, *guidance_interval)
    return classifier(score_fn, grad_log_p_y, classifier_scale) if classifier_scale else score_fn


def paired_classifier_free(sde: SDE, model: nn.Module, labels: Labels, w: float, continuous: bool = True,
                           parameterization=None) -> ScoreFn:
    """Classifier-free guidance of a conditional network, both scores from one pass (`paired_score_fn`)."""
    pair = paired_score_fn(sde, model, labels, continuous, parameterization)

    def score_fn(x: torch.Tensor, t) -> torch.Tensor:
        return cfg_combine(*pair(x, t), w)

    return score_fn


PER_CLASS = "per_class"  # sampling.class_labels=per_class: one grid row per class


def sample_label_rows(config, num_classes: int):
    """The class labels sampling.class_labels asks for, one grid row each: a tuple of ints, () for none;
    'per_class' means 0..num_classes−1 (the dataset's classes)."""
    labels = tuple(config.sampling.class_labels)
    return tuple(range(num_classes)) if labels == (PER_CLASS,) else labels


def guide_set(config) -> bool:
    """Whether config.sampling names an autoguidance guide (sampling.guide_workdir or sampling.guide_checkpoint)."""
    s = config.sampling
    return s.guide_workdir is not None or s.guide_checkpoint is not None


def check_config(config) -> None:
    """Class-conditional models and guidance: model.num_classes with model.conditional, training.label_dropout,
    sampling.guidance_scale, guidance_interval, guide_workdir / guide_checkpoint, classifier_scale and
    class_labels (their agreement with the data is the job of sde_diffusion.validation; the guide's with the model
    that of jobs/guide.py). Raises ConfigError naming the key."""
    t, s, m = config.training, config.sampling, config.model
    if m.num_classes and not m.conditional:
        raise ConfigError("model.num_classes > 0 adds the label embedding to the noise embedding: set "
                          "model.conditional=True")
    if not 0.0 <= t.label_dropout < 1.0:
        raise ConfigError(f"training.label_dropout must lie in [0, 1), got {t.label_dropout}")
    if s.guidance_scale < 0:
        raise ConfigError(f"sampling.guidance_scale must be ≥ 0, got {s.guidance_scale}")
    check_guide_config(config)
    text = m.text.encoder != "none"
    cfg = s.guidance_scale and not guide_set(config)  # classifier-free guidance (not autoguidance)
    if cfg and not (m.num_classes or text):
        raise ConfigError("sampling.guidance_scale ≠ 0 (classifier-free guidance) needs a class- or text-conditional "
                          "model: set model.num_classes and train with training.label_dropout > 0, or "
                          "model.text.encoder with training.caption_dropout > 0; or guide the model by a weaker "
                          "version of itself (autoguidance): set sampling.guide_checkpoint to an earlier checkpoint")
    if cfg and text and not t.caption_dropout:
        raise ConfigError("sampling.guidance_scale ≠ 0 needs the unconditional score, which the empty caption only "
                          "learns with training.caption_dropout > 0 (e.g. 0.1)")
    if cfg and not text and not t.label_dropout:
        raise ConfigError("sampling.guidance_scale ≠ 0 needs the unconditional score, which the null label only "
                          "learns with training.label_dropout > 0 (e.g. 0.1): retrain with it, or set "
                          "sampling.guidance_scale=0")
    check_guidance_interval(s)
    if s.classifier_scale < 0:
        raise ConfigError(f"sampling.classifier_scale must be ≥ 0, got {s.classifier_scale}")
    labels = tuple(s.class_labels)
    if labels and labels != (PER_CLASS,) and not all(isinstance(y, int) and not isinstance(y, bool) for y in labels):
        raise ConfigError(f"sampling.class_labels={labels!r} must be class indices such as (3,) or (0, 5), or "
                          f"{PER_CLASS!r}")
    if labels and not (m.num_classes or s.classifier_scale or (text and config.data.captions == "labels")):
        raise ConfigError("sampling.class_labels needs a class-conditional model (model.num_classes > 0), a "
                          "text-conditioned one trained on captions of the labels (data.captions='labels') or "
                          "classifier guidance (sampling.classifier_scale > 0)")


def check_guide_config(config) -> None:
    """sampling.guide_workdir / guide_checkpoint: a guide is only used with sampling.guidance_scale > 0."""
    s = config.sampling
    if s.guide_checkpoint is not None and s.guide_checkpoint < 1:
        raise ConfigError(f"sampling.guide_checkpoint={s.guide_checkpoint}: numbered checkpoints start at 1 "
                          "(workdir/checkpoints/checkpoint_<k>.pth)")
    if guide_set(config) and not s.guidance_scale:
        raise ConfigError("sampling.guide_workdir / sampling.guide_checkpoint name the guide of autoguidance, which "
                          "sampling.guidance_scale=0 does not use: set sampling.guidance_scale > 0 (e.g. 1), or "
                          "leave the guide unset")


def check_guidance_interval(s) -> None:
    """sampling.guidance_interval: None or (σ_lo, σ_hi) with 0 ≤ σ_lo < σ_hi, and guidance to limit."""
    if s.guidance_interval is None:
        return
    bounds = tuple(s.guidance_interval)
    if len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds) \
            or not 0 <= bounds[0] < bounds[1]:
        raise ConfigError(f"sampling.guidance_interval={bounds!r} must be (σ_lo, σ_hi) with 0 ≤ σ_lo < σ_hi, in "
                          "noise levels σ(t)/α(t), e.g. (0.3, 5.0); None applies guidance at every level")
    if not s.guidance_scale:
        raise ConfigError("sampling.guidance_interval limits guidance to an interval of noise levels, but "
                          "sampling.guidance_scale=0 applies none: set sampling.guidance_scale > 0 (classifier-free "
                          "guidance, or autoguidance with sampling.guide_checkpoint), or "
                          "sampling.guidance_interval=None")
