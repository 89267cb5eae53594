"""Prompt agreement of a text-conditioned digits model: how often a digit classifier reads the prompted digit.

    python main.py --config configs/text_digits.py --mode train
    python benchmarks/text_agreement.py --workdir runs/text_digits --guidance 2 --out runs/text_digits/agreement

For every digit and every caption of the training phrasings and of the held-out ones ("a tiny digit 7", … never
seen in training), `--per_caption` samples are drawn with that prompt at classifier-free guidance w = `--guidance`
from the newest checkpoint (EMA weights), and classified by a logistic regression fitted on the training split's
8×8 digits (its accuracy on the test split is reported beside). Writes agreement.json and agreement.md: the rate
per digit and per phrasing set, and a PNG grid (one row per digit, prompted "a handwritten <name>").
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sde_diffusion import guidance, sampling  # noqa: E402
from sde_diffusion.checkpoints import write_json  # noqa: E402
from sde_diffusion.config import load_config_file  # noqa: E402
from sde_diffusion.data.datasets import load_digits_uint8, DIGITS_LEVELS  # noqa: E402
from sde_diffusion.jobs import builder  # noqa: E402
from sde_diffusion.text import DIGIT_PHRASINGS  # noqa: E402
from sde_diffusion.visualize import save_image_grid  # noqa: E402


def digit_classifier():
    """A logistic regression on the training split's pixels in [0, 1]; its test accuracy."""
    from sklearn.linear_model import LogisticRegression
    train, test, train_y, test_y = load_digits_uint8()
    flat = lambda x: x.reshape(len(x), -1).numpy() / (DIGITS_LEVELS - 1)  # noqa: E731
    classifier = LogisticRegression(max_iter=2000).fit(flat(train), train_y.numpy())
    return classifier, float(classifier.score(flat(test), test_y.numpy()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/text_digits.py")
    parser.add_argument("--workdir", default="runs/text_digits")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--per_caption", type=int, default=20)
    parser.add_argument("--method", default="dpm_solver")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = load_config_file(args.config)
    workdir = Path(args.workdir)
    out = Path(args.out or workdir / "agreement")
    sde, dataset, model = builder.build(config, "cpu", workdir=workdir)
    _, path = builder.newest_checkpoint(workdir)
    builder.load_weights(path, model, dataset)
    model.eval()
    classifier, test_accuracy = digit_classifier()
    report = {"checkpoint": str(path), "guidance_scale": args.guidance, "sampler": f"{args.method}@{args.steps}",
              "samples_per_caption": args.per_caption, "classifier_test_accuracy": test_accuracy}
    start = time.time()
    for held_out in (False, True):
        captions, labels = DIGIT_PHRASINGS.all_captions(held_out), DIGIT_PHRASINGS.all_labels(held_out)
        tokens = model.text.tokenize(captions).repeat_interleave(args.per_caption, 0)
        wanted = np.repeat(labels, args.per_caption)
        score_fn = guidance.guided_score_fn(sde, model, tokens, guidance_scale=args.guidance)
        with torch.no_grad():
            x, _ = sampling.sample(score_fn, sde, (len(tokens), *dataset.shape), args.method, steps=args.steps,
                                   generator=torch.Generator().manual_seed(config.seed), progress=True)
        images = dataset.from_model(x).clamp(0, 1)
        predicted = classifier.predict(images.reshape(len(images), -1).numpy())
        agree = predicted == wanted
        key = "held_out" if held_out else "training"
        report[key] = {"captions": len(captions), "agreement": float(agree.mean()),
                       "per_digit": {str(k): float(agree[wanted == k].mean()) for k in range(10)},
                       "worst_caption": min(((float(agree[i * args.per_caption:(i + 1) * args.per_caption].mean()),
                                              c) for i, c in enumerate(captions)))}
        if not held_out:
            first = [captions.index(f"a handwritten {DIGIT_PHRASINGS.names[k][0]}") for k in range(10)]
            rows = torch.cat([images[i * args.per_caption:(i + 1) * args.per_caption][:10] for i in first])
            save_image_grid(rows, out / "prompted_rows.png", nrow=10)
    report["seconds"] = time.time() - start
    write_json(out / "agreement.json", report)
    lines = ["| phrasings | captions | agreement | worst digit | worst caption |", "|---|---|---|---|---|"]
    for key in ("training", "held_out"):
        r = report[key]
        digit = min(r["per_digit"], key=r["per_digit"].get)
        lines.append(f"| {key} | {r['captions']} | {r['agreement']:.3f} | {digit}: {r['per_digit'][digit]:.3f} | "
                     f"{r['worst_caption'][1]!r}: {r['worst_caption'][0]:.2f} |")
    (out / "agreement.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("training", "held_out")}))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
