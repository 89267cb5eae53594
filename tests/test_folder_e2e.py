"""End to end on your own images: `python main.py --config configs/vp_folder_64.py` with only data.root pointing
at a folder of photo crops (plus overrides that make the network tiny) trains, resumes its data order and
evaluates; the second job reads the preprocessed cache instead of decoding.

Each test runs its modes in one process (tests/main_with_user_sampler.py --then_modes: main.py's cli.main, one torch
import for both jobs) and reads each job's own log, workdir/<mode>.log."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.data.image_size=16", "--config.model.nf=16", "--config.model.ch_mult=(1,2)",
        "--config.model.num_res_blocks=1", "--config.model.attn_resolutions=(8,)", "--config.training.batch_size=8",
        "--config.training.n_iters=4", "--config.training.snapshot_freq=4", "--config.training.log_freq=1",
        "--config.training.snapshot_freq_for_preemption=2", "--config.training.eval_freq=2",
        "--config.training.snapshot_sampling=False", "--config.sampling.steps=3", "--config.eval.end_ckpt=1",
        "--config.eval.num_samples=4", "--config.eval.batch_size=4", "--config.eval.enable_fid=False",
        "--config.device=cpu"]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """24 JPEG crops (20×24 to 27×31 pixels) of sklearn's two sample photos in nested class folders."""
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    root = tmp_path_factory.mktemp("own") / "photos"
    for k in range(24):
        top, left, height, width = 13 * k, 19 * k, 20 + k % 8, 24 + k % 8
        folder = root / ("china" if k % 2 == 0 else "flower") / f"batch_{k // 8}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[k % 2][top:top + height, left:left + width]).save(folder / f"{k:02d}.jpg", quality=90)
    return root


def main_py(workdir, modes, *overrides):
    """`--mode modes[0] --then_modes=modes[1:]` in one process; the log of each mode."""
    cmd = [sys.executable, str(ROOT / "tests" / "main_with_user_sampler.py"), "--config", "configs/vp_folder_64.py",
           "--mode", modes[0], f"--then_modes={','.join(modes[1:])}", "--workdir", str(workdir), *TINY, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return [(workdir / f"{mode}.log").read_text() for mode in modes]


@pytest.mark.usefixtures("one_thread")
def test_train_and_eval_on_a_folder_by_setting_data_root(photo_folder, tmp_path):
    root = f"--config.data.root={photo_folder}"
    log, eval_log = main_py(tmp_path, ("train", "eval"), root)
    assert "cached to" in log and "24 images (22 train, 2 test)" in log  # test_fraction 0.1 of 24 → 2
    [entry] = (photo_folder.parent / "sde_diffusion_cache").glob("photos_16px_RGB_lanczos_*.npz")
    with np.load(entry) as cached:
        assert cached["images"].shape == (24, 3, 16, 16) and cached["names"][0] == "china/batch_0/00.jpg"
    checkpoint = torch.load(tmp_path / "checkpoints" / "checkpoint_1.pth", weights_only=True)
    # 22 training images make 2 batches of 8 an epoch: step 4 is the second batch of epoch 1
    assert checkpoint["step"] == 4 and checkpoint["data"]["batches"] == {"epoch": 1, "position": 16}
    assert "cache hit" in eval_log and "cached to" not in eval_log
    report = json.loads((tmp_path / "eval" / "report_1.json").read_text())
    assert report["step"] == 4 and report["num_samples"] == 4 and report["nfe"] == 4  # 3 steps + denoising
    assert 0 < report["eval_loss"] < 10 and report["config"]["data"]["dataset"] == "folder"
    assert (tmp_path / "eval" / "samples_1.png").stat().st_size > 0


@pytest.mark.usefixtures("one_thread")
def test_class_conditional_model_on_folder_labels(photo_folder, tmp_path):
    """data.labels='folders' (china, flower) trains a class-conditional model whose per-class grid has a row per
    class folder."""
    conditional = [f"--config.data.root={photo_folder}", "--config.data.labels=folders",
                   "--config.model.num_classes=2", "--config.training.label_dropout=0.2",
                   "--config.training.n_iters=2", "--config.training.snapshot_freq=2"]
    _, log = main_py(tmp_path, ("train", "sample"), *conditional, "--config.sampling.class_labels=per_class",
                     "--config.sampling.guidance_scale=1.5")
    checkpoint = torch.load(tmp_path / "checkpoints" / "checkpoint_1.pth", weights_only=True)
    assert checkpoint["model"]["label_embed.table.weight"].shape[0] == 3  # two classes and the null label
    [grid] = (tmp_path / "samples").glob("*per_class*.png")
    assert "rows = labels [0, 1]" in log and Image.open(grid).size[1] > Image.open(grid).size[0] / 3
