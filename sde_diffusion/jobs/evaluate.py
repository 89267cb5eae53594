"""--mode eval: each numbered checkpoint eval.begin_ckpt..eval.end_ckpt, with EMA weights.

The checkpoints of the range that exist are evaluated in order and the missing ones skipped (one log line names
them); only a range with none of them is an error. With eval.wait=True eval walks the range and waits for each
checkpoint not written yet (as score_sde's evaluator does, so it can follow a training run), until
eval.wait_timeout seconds pass without it; a missing one is skipped once a later one exists (training writes
them in order). A checkpoint is taken once its `.sha256` sidecar is written too (the load verifies it).

Writes into workdir/<eval_folder>: report_<k>.json (eval loss, bits/dim, sampler, NFE, FID/KID/IS for images or
sliced W₂/NLL for toy data), samples_<k>.png and .npz, rounds_<k>/ (resumable sampling rounds),
forward_noising.png and trajectory_<k>.png (images); with eval.ema_sigma_rel > 0 (post-hoc EMA) each name but
forward_noising.png ends in _sigma_rel<σ> (report_<k>_sigma_rel<σ>.json, ...), and the report records the
reconstruction.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

import torch

from .. import distributed, latent, likelihood, sampling
from ..checkpoints import digest_path, save_npz, step_checkpoints, write_json
from ..errors import CheckpointError
from ..validation import validate_config
from ..visualize import TrajectoryRecorder, forward_noising_strip, save_strip, unit_scale
from . import builder
from .generation import (generate_and_score, image_metrics, make_conditioning, resolve_grid, sample_generators,
                         save_samples_picture)

log = logging.getLogger("sde_diffusion")

PICTURE_IMAGES = 8  # rows of the forward-noising and trajectory strips
NOISING_TIMES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)  # columns of the forward-noising strip
REPORT_LOG_OMITS = ("config", "sampler", "inception_weights")  # report keys left out of the log line
POLL_SECONDS = 30.0  # eval.wait=True: how often the checkpoint folder is looked at
SIDECAR_GRACE_SECONDS = 120.0  # eval.wait=True: a checkpoint still without its .sha256 sidecar this long after it
# appeared is taken as it is (its writer died between the two renames; the file itself was renamed complete)

clock = time.monotonic  # the waiting's clock and sleep (module attributes, so that tests can replace them)
sleep = time.sleep
T = TypeVar("T")


def run(config, workdir, eval_folder: str = "eval") -> None:
    """For each checkpoint eval.begin_ckpt..eval.end_ckpt, with EMA weights: eval loss, samples in resumable
    rounds, FID/KID/IS (images) or sliced W₂/NLL (toy data), a sample grid and report_<k>.json. Under torchrun the
    ranks share the sampling rounds; rank 0 alone computes the rest and writes the files (the same report as one
    process: every round is seeded by its index)."""
    validate_config(config)
    builder.check_post_hoc_ema(config, workdir)
    with builder.distributed_job(config) as (world, device):
        evaluate(config, Path(workdir), eval_folder, world, device)


def evaluate(config, workdir: Path, eval_folder: str, world: distributed.World, device: torch.device) -> None:
    builder.seed_everything(config.seed)
    sde, dataset, model = builder.build(config, device, workdir=workdir)
    out = builder.prepare_workdir(workdir / eval_folder)
    checkpoints = checkpoints_to_evaluate(config, workdir, world)  # without eval.wait: an empty range fails here
    e = config.eval
    metrics = None
    if e.enable_sampling and e.enable_fid and dataset.is_image:  # fail on missing weights before any sampling
        log.info("FID/KID reference statistics of the %s split (cached after the first eval)", e.fid_split)
        metrics = image_metrics(config, dataset, device, world)
    loss_fn = builder.make_loss_fn(config, sde)
    conditioning = make_conditioning(config, sde, model, dataset, workdir, device)  # loads a classifier first
    noising_picture = dataset.is_image and world.is_main
    for k, path in checkpoints:
        start = time.time()
        ckpt = builder.load_weights(path, model, dataset, config)
        model.eval()
        if noising_picture:  # once, after the first load (a latent model's scale comes from its checkpoint)
            save_forward_noising_picture(config, sde, dataset, out / "forward_noising.png")
            noising_picture = False
        if not world.is_main:  # the other ranks only help with the sampling rounds
            if e.enable_sampling:
                evaluate_samples(config, sde, conditioning, dataset, device, out, k, path, metrics, world)
            continue
        log.info("evaluating %s (step %d): %s", path.name, int(ckpt["step"]), ", ".join(
            what for what, on in (("eval loss", e.enable_loss), (f"{e.num_samples} samples", e.enable_sampling),
                                  ("bits/dim", e.enable_bpd)) if on))
        report = {"checkpoint": path.name, "step": int(ckpt["step"]), "config": config.to_dict()}
        if "ema_reconstruction" in ckpt:  # eval.ema_sigma_rel: the weights are a post-hoc EMA
            report["post_hoc_ema"] = ckpt["ema_reconstruction"]
        if conditioning.describe():
            report["conditioning"] = conditioning.describe()
        report.update(held_out_measures(config, sde, model, dataset, loss_fn, device, k))
        if e.enable_sampling:
            report.update(evaluate_samples(config, sde, conditioning, dataset, device, out, k, path, metrics, world))
        if world.distributed:
            report["world_size"] = world.world_size
        if e.enable_sampling and dataset.is_image:
            save_trajectory_picture(config, sde, conditioning, dataset, device,
                                    out / f"trajectory_{k}{builder.weights_suffix(config)}.png", k)
        report["eval_seconds"] = time.time() - start
        name = f"report_{k}{builder.weights_suffix(config)}.json"
        write_json(out / name, report)
        log.info("wrote %s: %s", out / name,
                 {key: v for key, v in report.items() if key not in REPORT_LOG_OMITS})


# --------------------------------------------------------------------------------------------------
# Which checkpoints: those of the range that exist, or (eval.wait) each one as it appears
# --------------------------------------------------------------------------------------------------
def checkpoints_to_evaluate(config, workdir: Path, world: distributed.World) -> Iterable[Tuple[int, Path]]:
    """(k, path) of the numbered checkpoints eval.begin_ckpt..eval.end_ckpt to evaluate, in order: those that
    exist now (a list; the CheckpointError of an empty range is raised here), or with eval.wait=True each one
    once it is written (a generator that waits). Rank 0 looks at the folder; every rank follows its answers."""
    if config.eval.wait:
        return waited_checkpoints(config, workdir, world)
    return [(k, Path(path)) for k, path in on_main(world, lambda: existing_checkpoints(config, workdir))]


def existing_checkpoints(config, workdir: Path) -> List[Tuple[int, str]]:
    """The checkpoints of the range that exist now; logs one line naming the skipped ones. An error when none."""
    e, folder = config.eval, workdir / builder.NUMBERED
    present = numbers_in(folder, e.begin_ckpt, e.end_ckpt)
    if not present:
        held = numbers_in(folder, 0, float("inf"))
        holds = ("that folder does not exist" if not folder.is_dir() else
                 f"it holds {numbered('checkpoint', spans(held))}" if held else "it is empty")
        raise CheckpointError(f"none of the checkpoints eval.begin_ckpt..eval.end_ckpt = {e.begin_ckpt}..{e.end_ckpt} "
                              f"is in {folder} ({holds}). Train first (--mode train), set eval.begin_ckpt and "
                              "eval.end_ckpt to checkpoints it holds, or set eval.wait=True to wait for them.")
    skipped = gaps(e.begin_ckpt, e.end_ckpt, present)
    if skipped:
        log.warning("skipped %s of eval.begin_ckpt..eval.end_ckpt = %d..%d (not written yet in %s); evaluating %s",
                    numbered("checkpoint", skipped), e.begin_ckpt, e.end_ckpt, folder, compact(spans(present)))
    return [(k, str(builder.numbered_checkpoint(workdir, k))) for k in present]


def numbers_in(folder: Path, first: int, last) -> List[int]:
    """The k of the files checkpoint_<k>.pth in folder with first <= k <= last, ascending (one listing)."""
    return sorted(k for k, path in step_checkpoints(folder) if first <= k <= last and path.is_file())


def waited_checkpoints(config, workdir: Path, world: distributed.World) -> Iterator[Tuple[int, Path]]:
    """eval.wait=True: each checkpoint of the range once it is written, in order; polls every POLL_SECONDS while
    it waits (logging once per checkpoint). A missing checkpoint is skipped (logged) as soon as a later one of the
    range exists. A CheckpointError when eval.wait_timeout seconds pass without the awaited one."""
    e = config.eval
    k, waiting_since, first_seen, evaluated = e.begin_ckpt, None, {}, []
    while k <= e.end_ckpt:
        action, then = on_main(world, lambda: next_step(config, workdir, k, waiting_since, first_seen, evaluated))
        if action == "evaluate":
            yield k, builder.numbered_checkpoint(workdir, k)
            evaluated.append(k)
            k, waiting_since = k + 1, None
        elif action == "skip":
            k, waiting_since = then, None
        else:
            if waiting_since is None:
                waiting_since = clock()
                if world.is_main:
                    log.info("eval.wait=True: waiting for %s in %s (looking every %g s, for up to "
                             "eval.wait_timeout=%g s)", builder.numbered_checkpoint(workdir, k).name,
                             workdir / builder.NUMBERED, POLL_SECONDS, e.wait_timeout)
            sleep(POLL_SECONDS)


def next_step(config, workdir: Path, k: int, waiting_since: Optional[float], first_seen: Dict[int, float],
              evaluated: List[int]) -> Tuple[str, Optional[int]]:
    """What eval.wait does next about checkpoint k: ("evaluate", None), ("skip", the next present one) or
    ("wait", None); a CheckpointError when it has waited eval.wait_timeout seconds."""
    e, folder, path = config.eval, workdir / builder.NUMBERED, builder.numbered_checkpoint(workdir, k)
    later = next(iter(numbers_in(folder, k + 1, e.end_ckpt)), None)
    if path.is_file():
        if digest_path(path).is_file() or later is not None:  # complete, or its writer has moved on
            return "evaluate", None
        seen = first_seen.setdefault(k, clock())
        if clock() - seen >= SIDECAR_GRACE_SECONDS:
            log.warning("%s has had no %s for %g s: taking it unverified (its writer died between the two "
                        "renames)", path, digest_path(path).name, SIDECAR_GRACE_SECONDS)
            return "evaluate", None
        return "wait", None  # renamed a moment ago: its sidecar comes next
    if later is not None:
        log.warning("skipped %s of eval.begin_ckpt..eval.end_ckpt = %d..%d (not in %s, but checkpoint_%d.pth "
                    "is: training wrote past it)", numbered("checkpoint", [(k, later - 1)]), e.begin_ckpt,
                    e.end_ckpt, folder, later)
        return "skip", later
    if waiting_since is not None and clock() - waiting_since >= e.wait_timeout:
        so_far = f"evaluated {compact(spans(evaluated))} so far" if evaluated else "none evaluated"
        raise CheckpointError(f"eval.wait=True: {path.name} did not appear in {folder} within eval.wait_timeout="
                              f"{e.wait_timeout:g} s (eval.begin_ckpt..eval.end_ckpt = {e.begin_ckpt}..{e.end_ckpt}, "
                              f"{so_far}). Check that training is still running, or raise eval.wait_timeout.")
    return "wait", None


def on_main(world: distributed.World, decide: Callable[[], T]) -> T:
    """decide() on rank 0 and its answer on every rank; a CheckpointError it raises is raised on every rank."""
    if not world.distributed:
        return decide()
    answer, error = None, None
    if world.is_main:
        try:
            answer = decide()
        except CheckpointError as err:
            error = err
    answer, message = distributed.broadcast((answer, None if error is None else str(error)), world)
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(message)
    return answer


Span = Tuple[int, int]  # first, last (inclusive)


def spans(ks: List[int]) -> List[Span]:
    """Ascending numbers as runs of consecutive ones: [1, 3, 4, 5, 9] → [(1, 1), (3, 5), (9, 9)]."""
    runs: List[Span] = []
    for k in ks:
        if runs and k == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], k)
        else:
            runs.append((k, k))
    return runs


def gaps(first: int, last: int, present: List[int]) -> List[Span]:
    """The runs of first..last missing from `present` (ascending, within the range)."""
    out, k = [], first
    for j in present + [last + 1]:
        if j > k:
            out.append((k, j - 1))
        k = j + 1
    return out


def compact(runs: List[Span]) -> str:
    """[(1, 1), (3, 5), (9, 9)] → '1, 3-5, 9'."""
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def numbered(noun: str, runs: List[Span]) -> str:
    """'checkpoint 4' or 'checkpoints 2, 4-5'."""
    return f"{noun}{'' if len(runs) == 1 and runs[0][0] == runs[0][1] else 's'} {compact(runs)}"


def held_out_measures(config, sde, model, dataset, loss_fn, device, k: int) -> Dict:
    """eval_loss (class-conditional models: with the test split's labels), bits/dim (class-conditional models:
    of the null label's unconditional score, so of p(x)) and a latent model's latent NLL, as eval.enable_loss,
    enable_bpd and enable_latent_nll ask."""
    e, report = config.eval, {}
    score_fn_for = builder.labelled_score_fn(config, sde, model)
    if e.enable_loss:
        batches = builder.condition_batches(config, model, dataset, e.batch_size, device)
        report["eval_loss"] = builder.evaluation_loss(loss_fn, score_fn_for, model, batches, seed=config.seed)
    if e.enable_bpd:
        generator = torch.Generator(device=device).manual_seed(builder.round_seed(config.seed, k))
        report.update(likelihood.evaluate_bpd(score_fn_for(None), sde, dataset, config, device, generator))
    if e.enable_latent_nll:
        generator = torch.Generator(device=device).manual_seed(builder.round_seed(config.seed, k))
        report.update(latent.evaluate_latent_nll(score_fn_for(None), sde, dataset, config, device, generator))
    return report


def evaluate_samples(config, sde, conditioning, dataset, device, out: Path, k: int, path: Path,
                     metrics, world: distributed.World) -> Optional[Dict]:
    """Generate eval.num_samples in rounds (each saved, so a killed eval resumes), score them, save a grid.
    Under torchrun every rank makes its share of the rounds; rank 0 gets the report, the others None."""
    settings = builder.sampler_settings(config, sde)
    suffix = builder.weights_suffix(config)
    samples, report = generate_and_score(config, sde, conditioning, dataset, device, out / f"rounds_{k}{suffix}",
                                         (config.seed, k), settings, config.eval.num_samples, metrics,
                                         {"checkpoint": path.name}, world)
    if not world.is_main:
        return None
    save_npz(out / f"samples_{k}{suffix}.npz", samples=samples.numpy())
    save_samples_picture(samples[:config.sampling.num_grid_samples], dataset, out / f"samples_{k}{suffix}.png",
                         title=f"{path.name}, NFE {report['nfe']}")
    return report


def save_forward_noising_picture(config, sde, dataset, path: Path) -> None:
    """Test images diffused to x_t for several t (one row per image), rescaled to unit variance."""
    x0 = next(dataset.eval_batches(PICTURE_IMAGES))
    times = [max(t, sde.default_eps) for t in NOISING_TIMES]
    columns = forward_noising_strip(sde, x0, times, generator=torch.Generator().manual_seed(config.seed))
    save_strip([dataset.from_model(c) for c in columns], path)


def save_trajectory_picture(config, sde, conditioning, dataset, device, path: Path, k: int) -> None:
    """How the first PICTURE_IMAGES scored samples came about (their seeds, labels and grid): two rows per sample,
    8 of the sampler's states from the prior to eps (rescaled to unit variance) and below each its denoised
    estimate x̂₀; the last x̂₀ is the returned sample."""
    recorder = TrajectoryRecorder()
    settings = resolve_grid(config, sde, conditioning, dataset, builder.sampler_settings(config, sde), device,
                            config.eval.num_samples)  # the grid of the scored samples
    sampling.sample(conditioning.score_fn(0, PICTURE_IMAGES, device), sde, (PICTURE_IMAGES, *dataset.shape),
                    generator=sample_generators((config.seed, k), 0, PICTURE_IMAGES, device), device=device,
                    callback=recorder, **settings)
    columns = [torch.stack([dataset.from_model(unit_scale(sde, state, t)), dataset.from_model(x0)], dim=1)
               for t, state, x0 in recorder.pick(8)]
    save_strip([column.flatten(0, 1) for column in columns], path)  # rows 2i, 2i + 1: sample i's states, x̂₀
