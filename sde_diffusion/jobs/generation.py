"""Samples for the jobs: what they are conditioned on (class labels, classifier-free guidance, classifier
guidance with the classifier of `train_classifier`), drawn in batches or in resumable, scored rounds, and their
pictures."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import classifier as noisy_classifier
from .. import distributed, guidance, parameterization, sampling
from ..checkpoints import load_checkpoint
from ..data.datasets import dataset_classes
from ..errors import CheckpointError
from ..models.text_conditioning import dataset_captions
from ..visualize import save_image_grid, save_scatter
from .builder import round_seed, sampler_settings
from .guide import Guide, load_guide

SEEDING = "per sample: round_seed(*seed_keys, index)"  # in round fingerprints: rounds seeded otherwise are not mixed in


class Conditioning:
    """What samples are conditioned on (config.sampling): class labels, classifier-free guidance with
    sampling.guidance_scale (or autoguidance, given the guide; in sampling.guidance_interval only, when set),
    classifier guidance with sampling.classifier_scale.

    Sample i gets label `label_sequence[i mod len]`: by default the labels of the test split in order, so that a
    conditional model's samples follow the data's class frequencies (eval, snapshots); `--mode sample` with
    sampling.class_labels passes its own sequence (one block per grid row). A text-conditioned network gets a
    caption for each label (drawn from the training phrasings, seeded by the sample index), or the token ids of
    `prompt_tokens` (1, L) for every sample. Unconditional (no conditional model, no classifier guidance): every
    score function is the network's plain score.
    """

    def __init__(self, config, sde, model, dataset, *, classifier: Optional[torch.nn.Module] = None,
                 label_sequence: Optional[torch.Tensor] = None, prompt_tokens: Optional[torch.Tensor] = None,
                 guide: Optional[Guide] = None):
        s = config.sampling
        self.sde, self.model, self.continuous = sde, model, config.training.continuous
        self.parameterization = parameterization.from_config(config, sde)
        self.classifier = classifier
        self.guide = guide  # autoguidance's (jobs/guide.py); a config naming one but not given it: no guidance
        self.guidance_scale = s.guidance_scale if guide is not None or not guidance.guide_set(config) else 0.0
        self.guidance_interval = s.guidance_interval if self.guidance_scale else None
        self.classifier_scale = s.classifier_scale if classifier is not None else 0.0
        captions = dataset_captions(config, model, dataset)
        self.prompt = s.prompt if prompt_tokens is not None else None
        self.labelled = config.model.num_classes > 0 or self.classifier_scale > 0 or captions is not None
        self.from_test_split = label_sequence is None and prompt_tokens is None
        self.label_sequence = None
        if prompt_tokens is not None:
            self.label_sequence = prompt_tokens.long()
        elif captions is not None:  # a caption per test image, or per requested label
            generator = torch.Generator().manual_seed(config.seed)
            self.label_sequence = (captions.split_tokens(dataset, "test", generator) if label_sequence is None
                                   else captions(label_sequence.long(), generator))
        elif self.labelled:
            self.label_sequence = dataset.test_labels.long() if label_sequence is None else label_sequence.long()
        self.captioned = captions is not None and prompt_tokens is None

    def labels(self, start: int, n: int) -> Optional[torch.Tensor]:
        """Labels (n,) (or prompt token ids (n, L)) of samples start..start+n−1, or None when unconditional."""
        if not self.labelled:
            return None
        return self.label_sequence[(start + torch.arange(n)) % len(self.label_sequence)]

    def score_fn(self, start: int, n: int, device):
        """The (guided) score function for samples start..start+n−1."""
        labels = self.labels(start, n)
        if labels is not None:
            labels = labels.to(device)
        grad = None
        if self.classifier_scale:
            grad = noisy_classifier.grad_log_p_y_fn(self.sde, self.classifier, labels)
        return guidance.guided_score_fn(self.sde, self.model, labels, guidance_scale=self.guidance_scale,
                                        continuous=self.continuous, grad_log_p_y=grad,
                                        classifier_scale=self.classifier_scale,
                                        parameterization=self.parameterization,
                                        guide_score_fn=self.guide.score_for(labels) if self.guide else None,
                                        guidance_interval=self.guidance_interval)

    def describe(self) -> Dict:
        """For reports and round fingerprints: {} when unconditional and unguided."""
        guided = {**({"guide": self.guide.describe()} if self.guide else {}),
                  **({"guidance_interval": list(self.guidance_interval)} if self.guidance_interval else {})}
        if not self.labelled:
            return {"guidance_scale": self.guidance_scale, **guided} if guided else {}
        source = "test split, in order" if self.from_test_split else "sampling.class_labels"
        described = {"labels": source if self.prompt is None else None, "guidance_scale": self.guidance_scale,
                     "classifier_scale": self.classifier_scale, **guided}
        if self.captioned:
            described["captions"] = "a caption per test image" if self.from_test_split else "per label"
        if self.prompt is not None:
            described["prompt"] = self.prompt
        return described


def load_classifier(config, workdir: Path, device, num_classes: Optional[int] = None) -> torch.nn.Module:
    """The classifier written by `train_classifier` (eval mode); a clear error when it is missing or mismatched.
    num_classes: datasets.dataset_classes(config, dataset); None: a built-in dataset's count."""
    if num_classes is None:
        num_classes = dataset_classes(config)
    path = noisy_classifier.checkpoint_path(workdir)
    if not path.exists():
        raise CheckpointError(f"sampling.classifier_scale={config.sampling.classifier_scale} needs the classifier "
                              f"{path}, which does not exist: run --mode train_classifier first (same --workdir)")
    model = noisy_classifier.create_classifier(config, num_classes).to(device)
    try:
        model.load_state_dict(load_checkpoint(path, device)["model"], strict=True)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path} does not fit the classifier built from config.classifier: {err}") from err
    return model.eval()


def make_conditioning(config, sde, model, dataset, workdir: Path, device, *,
                      label_sequence: Optional[torch.Tensor] = None,
                      prompt_tokens: Optional[torch.Tensor] = None) -> Conditioning:
    """Conditioning from config.sampling, loading the classifier when sampling.classifier_scale > 0 and
    autoguidance's guide when sampling names one."""
    guide = load_guide(config, workdir, sde, device)
    classifier = (load_classifier(config, workdir, device, dataset_classes(config, dataset))
                  if config.sampling.classifier_scale > 0 else None)
    return Conditioning(config, sde, model, dataset, classifier=classifier, label_sequence=label_sequence,
                        prompt_tokens=prompt_tokens, guide=guide)


def resolve_grid(config, sde, conditioning, dataset, settings: Dict, device, num: int) -> Dict:
    """settings with an "auto" grid (sampling/auto_grid.py) fitted once, to the first round's score function at
    its shape (num samples in rounds of eval.batch_size): every round runs the same times, and processes agree on
    them (the centre is rounded)."""
    n = min(num, config.eval.batch_size)
    return sampling.resolve_auto(settings, conditioning.score_fn(0, n, device), sde, (n, *dataset.shape),
                                 device=device)


def sample_generators(seed_keys: Sequence[int], start: int, n: int, device) -> sampling.SampleGenerators:
    """The generators of samples start..start+n−1: sample i's seed is round_seed(*seed_keys, i), so it depends on
    the run's seed keys and its index alone, not on eval.batch_size, the round or the number of ranks."""
    return sampling.SampleGenerators([round_seed(*seed_keys, i) for i in range(start, start + n)], device)


def draw_samples(config, sde, model, dataset, num: int, device, seed: int,
                 conditioning: Optional[Conditioning] = None) -> Tuple[torch.Tensor, int]:
    """num samples in [0, 1] (images) or data space (toy), generated in rounds of eval.batch_size; sample i seeded
    by (seed, i)."""
    model.eval()
    conditioning = conditioning or Conditioning(config, sde, model, dataset)
    settings, chunks, nfe = sampler_settings(config, sde), [], 0
    settings = resolve_grid(config, sde, conditioning, dataset, settings, device, num)
    for start in range(0, num, config.eval.batch_size):
        n = min(config.eval.batch_size, num - start)
        x, nfe = sampling.sample(conditioning.score_fn(start, n, device), sde, (n, *dataset.shape),
                                 generator=sample_generators((seed,), start, n, device), device=device,
                                 progress=True, **settings)
        chunks.append(dataset.from_model(x).cpu())
    return torch.cat(chunks), nfe


def save_samples_picture(samples: torch.Tensor, dataset, path: Path, title: str = "") -> None:
    """A grid of images, or a scatter plot of vectors over the test split."""
    if dataset.is_image:
        save_image_grid(samples, path)
    else:
        save_scatter(samples, path, reference=dataset.test, title=title)


def image_metrics(config, dataset, device, world: distributed.World):
    """Inception and the reference statistics; rank 0 first, so that the others read its cached statistics."""
    from evaluation.sample_quality import ImageMetrics
    metrics = ImageMetrics(config, dataset, device) if world.is_main else None
    distributed.barrier(world)
    return metrics if metrics is not None else ImageMetrics(config, dataset, device)


def generate_and_score(config, sde, conditioning, dataset, device, folder: Path, seed_keys, settings: Dict,
                       num: int, metrics, fingerprint: Dict, world: distributed.World = distributed.World(), *,
                       resamples: int = 0) -> Tuple[torch.Tensor, Dict]:
    """num samples with `settings` and `conditioning` (labels, guidance), in resumable rounds of eval.batch_size,
    sample i seeded by (*seed_keys, i) (`sample_generators`), and their metrics: FID/KID/IS for images (when
    `metrics`, an ImageMetrics, is given), sliced W₂ / NLL for toy data; resamples > 0 adds each metric's standard error `<metric>_se` (see
    evaluation/sample_quality.py; seeded by config.seed). Under torchrun the ranks share the rounds and only rank
    0 gets results ((None, None) on the others)."""
    from evaluation.rounds import run_in_rounds
    from evaluation.sample_quality import toy_scores

    resolved = resolve_grid(config, sde, conditioning, dataset, settings, device, num)

    def make_round(r: int, n: int) -> Dict[str, np.ndarray]:
        round_start = time.time()
        start = r * config.eval.batch_size
        x, nfe = sampling.sample(conditioning.score_fn(start, n, device), sde, (n, *dataset.shape),
                                 generator=sample_generators(seed_keys, start, n, device), device=device,
                                 progress=True, **resolved)
        samples = dataset.from_model(x).cpu()
        result = {"samples": samples.numpy(), "nfe": np.full(n, nfe),
                  "sample_seconds": np.full(n, (time.time() - round_start) / n)}  # per sample, so sums add up
        if metrics is not None:
            result.update(round_features(metrics, samples))
        return result

    fitted = resolved.get("grid") is not settings.get("grid")  # an "auto" grid: its times are part of the result
    fingerprint = {**fingerprint, "sampler": settings, "seed_keys": list(seed_keys), "seeds": SEEDING,
                   **({"grid_times": resolved["grid"].tolist()} if fitted else {}),
                   "round_size": config.eval.batch_size,
                   "inception_sha256": metrics.weights.sha256 if metrics else None}
    if conditioning.describe():
        fingerprint["conditioning"] = conditioning.describe()
    rounds = run_in_rounds(folder, num, config.eval.batch_size, make_round, fingerprint, desc=folder.name,
                           rank=world.rank, world_size=world.world_size, barrier=lambda: distributed.barrier(world))
    if rounds is None:
        return None, None
    samples = torch.from_numpy(rounds["samples"])
    report = {"sampler": settings, "nfe": int(rounds["nfe"][0]), "num_samples": len(samples),
              "sampling_seconds": float(rounds["sample_seconds"].sum())}
    if metrics is not None:
        report.update(metrics.describe())
        report.update(metrics.scores(rounds["features"], rounds.get("probabilities"), resamples))
    elif not dataset.is_image:
        report.update(toy_scores(samples, dataset, resamples, config.seed))
    return samples, report


def round_features(metrics, samples: torch.Tensor) -> Dict[str, np.ndarray]:
    """Inception features (and class probabilities, when the weights have logits) of one round of samples."""
    from evaluation.inception import to_uint8_rgb
    pixels = to_uint8_rgb(samples)
    result = {"features": metrics.network.features(pixels)}
    probabilities = metrics.network.probabilities(pixels)
    if probabilities is not None:
        result["probabilities"] = probabilities
    return result
