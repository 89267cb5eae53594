"""Class-conditional models end to end: label embeddings in every network, labelled batches, config checks, the
noise-conditional classifier (trained on the 2-D mixture against the Bayes-optimal accuracy), `--mode sample` with
labels and guidance in process and through main.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import run_lib
from configs import toy_gmm, vp_digits, vp_digits_cond
from sde_diffusion import classifier as noisy_classifier
from sde_diffusion import guidance
from sde_diffusion.checkpoints import CheckpointError
from sde_diffusion.config import ConfigError, default_config, validate_config
from sde_diffusion.data.datasets import DatasetError, ToyDataset, get_dataset
from sde_diffusion.interop import ReferenceCheckpointError, convert_checkpoint
from sde_diffusion.models import create_model, get_score_fn
from sde_diffusion.sampling import sample
from sde_diffusion.sdes import VPSDE
from sde_diffusion.toy import default_mixture

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------
def network_config(name: str, num_classes: int):
    config = default_config()
    m = config.model
    m.name, m.num_classes, m.dropout = name, num_classes, 0.0
    if name == "mlp":
        config.data.dataset, m.nf, m.num_res_blocks = "gmm", 32, 1
    else:
        config.data.dataset, config.data.image_size, config.data.num_channels = "digits", 8, 1
        m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2), 1, (4,)
        m.depth, m.num_heads, m.patch_size = 1, 2, 2
    if name == "edm2":
        m.noise_conditioning = "log_sigma"
    return config


# width of the embedding the labels are added to, per network: 4·nf (U-Nets), 2·nf (MLP), nf (DiT), nf·max(ch_mult)
# (EDM2)
EMBEDDING_WIDTH = {"ddpm": 128, "ncsnpp": 128, "mlp": 64, "dit": 32, "edm2": 64}
ONE_HOT = ("edm2",)  # labels embedded as one-hot vectors, the null label as the zero vector: no null-label row


@pytest.mark.parametrize("name", sorted(EMBEDDING_WIDTH))
def test_label_embedding_conditions_the_output_and_none_is_the_null_label(name):
    classes = 4 if name == "mlp" else 10
    config = network_config(name, classes)
    validate_config(config)
    torch.manual_seed(0)
    model = create_model(config).eval()
    unconditional = create_model(network_config(name, 0))
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    rows = classes if name in ONE_HOT else classes + 1
    assert count(model) == count(unconditional) + rows * EMBEDDING_WIDTH[name]
    assert not any("label" in key for key in unconditional.state_dict())  # unconditional layout unchanged
    with torch.no_grad():
        for p in model.parameters():  # random weights everywhere (DiT and the output layers start at zero)
            p.copy_(torch.randn(p.shape) * p.numel() ** -0.25)
        x = torch.randn(3, 2) if name == "mlp" else torch.randn(3, 1, 8, 8)
        cond = torch.tensor([100.0, 500.0, 900.0])
        outputs = [model(x, cond, torch.full((3,), y)) for y in (0, 1, classes)]
        assert (outputs[0] - outputs[1]).abs().max() > 1e-3 * outputs[0].abs().max()
        torch.testing.assert_close(model(x, cond), outputs[2], rtol=0, atol=0)  # y=None ≡ the null label
    with pytest.raises(ValueError, match="num_classes"):
        unconditional(x, cond, torch.zeros(3, dtype=torch.long))


def test_conditional_forward_compiles_without_graph_breaks():
    model = create_model(network_config("ddpm", 10)).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x, cond, y = torch.rand(2, 1, 8, 8), torch.tensor([100.0, 700.0]), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, cond, y), model(x, cond, y))
        torch.testing.assert_close(compiled(x, cond), model(x, cond))
    torch._dynamo.reset()


def test_score_fn_labels_select_the_class_and_must_fit_the_model():
    model = create_model(network_config("mlp", 4)).eval()
    sde, x, t = VPSDE(), torch.randn(4, 2), torch.full((4,), 0.5)
    with torch.no_grad():
        per_sample = get_score_fn(sde, model, labels=torch.tensor([2, 2, 2, 2]))(x, t)
        torch.testing.assert_close(get_score_fn(sde, model, labels=2)(x, t), per_sample)
    with pytest.raises(ValueError, match="batch"):
        get_score_fn(sde, model, labels=torch.tensor([0, 1]))(x, t)
    with pytest.raises(ValueError, match="num_classes"):
        get_score_fn(sde, create_model(network_config("mlp", 0)), labels=1)


def test_score_sde_pytorch_checkpoints_need_an_unconditional_config():
    config = network_config("ddpm", 10)
    with pytest.raises(ReferenceCheckpointError, match="num_classes=0"):
        convert_checkpoint({"model": {}, "ema": {}}, config)


# --------------------------------------------------------------------------------------------------
# Labelled batches
# --------------------------------------------------------------------------------------------------
def test_digits_batches_with_labels_are_the_same_batches_with_their_labels():
    config = vp_digits.get_config()
    config.data.random_flip, config.data.uniform_dequantization, config.training.batch_size = True, True, 32
    plain, labelled = get_dataset(config), get_dataset(config)
    for _ in range(60):  # past an epoch boundary (1500 images)
        idx = plain.batches._perm[plain.batches.position:plain.batches.position + 32]
        if plain.batches.position + 32 > plain.batches.n:
            idx = None
        x = plain.train_batch()
        x_l, y = labelled.train_batch(with_labels=True)
        assert torch.equal(x, x_l) and y.dtype == torch.int64
        if idx is not None:
            assert torch.equal(y, plain.train_labels[idx])
    x, y = next(labelled.eval_batches(50, with_labels=True))
    assert torch.equal(y, labelled.test_labels[:50]) and torch.equal(x, next(labelled.eval_batches(50)))


def test_toy_mixture_labels_are_the_components_of_the_same_draws():
    plain, labelled = ToyDataset("gmm", batch_size=512, seed=3), ToyDataset("gmm", batch_size=512, seed=3)
    x = plain.train_batch()
    x_l, y = labelled.train_batch(with_labels=True)
    assert torch.equal(x, x_l)
    mixture = default_mixture()
    assert (mixture.posterior(x).argmax(1) == y).double().mean() >= 0.999  # modes 4 apart, std 0.3
    assert (mixture.posterior(plain.test).argmax(1) == plain.test_labels).double().mean() >= 0.999
    with pytest.raises(DatasetError, match="no class labels"):
        ToyDataset("swiss_roll", batch_size=8, seed=0).train_batch(with_labels=True)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    ({"model.num_classes": 3}, "model.num_classes"),
    ({"model.num_classes": 10, "model.conditional": False}, "model.conditional"),
    ({"training.label_dropout": 0.1}, "training.label_dropout"),
    ({"model.num_classes": 10, "training.label_dropout": 1.0}, "training.label_dropout"),
    ({"sampling.guidance_scale": 1.0}, "sampling.guidance_scale"),
    ({"model.num_classes": 10, "sampling.guidance_scale": 1.0}, "label_dropout"),
    ({"model.num_classes": 10, "training.label_dropout": 0.1, "sampling.guidance_scale": -1.0}, "guidance_scale"),
    ({"sampling.class_labels": (3,)}, "sampling.class_labels"),
    ({"model.num_classes": 10, "sampling.class_labels": (10,)}, "0..9"),
    ({"model.num_classes": 10, "sampling.class_labels": ("all",)}, "per_class"),
    ({"sampling.classifier_scale": -1.0}, "classifier_scale"),
    ({"data.dataset": "swiss_roll", "model.name": "mlp", "eval.enable_bpd": False, "sampling.classifier_scale": 1.0},
     "no class labels"),
    ({"classifier.n_iters": 0}, "classifier.n_iters"),
    ({"classifier.attn_resolutions": (3,)}, "classifier.attn_resolutions"),
    ({"classifier.ch_mult": (1, 2, 2, 2, 2)}, "classifier.ch_mult"),
])
def test_bad_conditioning_settings_name_the_key(settings, message):
    config = vp_digits.get_config()
    for key, value in settings.items():
        section, name = key.split(".")
        config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_conditional_digits_config_is_valid():
    config = vp_digits_cond.get_config()
    validate_config(config)
    assert config.model.num_classes == 10 and 0 < config.training.label_dropout < 1
    config.sampling.class_labels, config.sampling.guidance_scale = ("per_class",), 2.0
    validate_config(config)


# --------------------------------------------------------------------------------------------------
# Noise-conditional classifier on the 2-D mixture
# --------------------------------------------------------------------------------------------------
CLASSIFIER_TIMES = (0.01, 0.1, 0.25, 0.5)
# classifier accuracy ≥ Bayes-optimal accuracy − this on the same noisy test points; measured within 0.008
MAX_ACCURACY_GAP = 0.025
# fraction of classifier-guided samples (exact unconditional score + the trained classifier's gradient, scale 1)
# in their class's mode; measured 0.93 (unguided: the mixture weights, 0.1–0.4)
MIN_GUIDED_CLASS_FRACTION = 0.85


def toy_config():
    config = toy_gmm.get_config()
    config.device = "cpu"
    config.training.batch_size = 256
    config.classifier.n_iters, config.classifier.lr, config.classifier.log_freq = 300, 3e-3, 100
    return config


@pytest.fixture(scope="module")
def toy_classifier(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy_classifier")
    config = toy_config()
    run_lib.train_classifier(config, workdir)
    return config, workdir


def test_classifier_trains_to_the_bayes_accuracy(toy_classifier):
    config, workdir = toy_classifier
    report = json.loads((workdir / "classifier" / "report.json").read_text())
    assert report["test_accuracy"]["0.01"] >= 0.99
    model, sde, mixture = run_lib.load_classifier(config, workdir, "cpu"), VPSDE(), default_mixture()
    dataset = ToyDataset("gmm", batch_size=8, seed=config.seed)
    generator = torch.Generator().manual_seed(0)
    for t in CLASSIFIER_TIMES:
        times = torch.full((len(dataset.test),), t)
        mean, std = sde.marginal_prob(dataset.test, times)
        x_t = mean + std[:, None] * torch.randn(dataset.test.shape, generator=generator)
        bayes = mixture._component_log_probs(x_t, sde.alpha(times).double(), sde.sigma(times).double()).argmax(1)
        with torch.no_grad():
            predicted = noisy_classifier.classifier_logits(model, sde, x_t, times).argmax(1)
        gap = ((bayes == dataset.test_labels).double().mean() - (predicted == dataset.test_labels).double().mean())
        assert gap <= MAX_ACCURACY_GAP, f"t={t}: accuracy {gap.item():.3f} below the Bayes-optimal one"


def test_trained_classifier_guides_the_exact_unconditional_score_to_the_class(toy_classifier):
    config, workdir = toy_classifier
    model, sde, mixture = run_lib.load_classifier(config, workdir, "cpu"), VPSDE(), default_mixture()
    labels = torch.arange(4).repeat_interleave(500)
    score_fn = guidance.classifier(mixture.marginal_score_fn(sde),
                                   noisy_classifier.grad_log_p_y_fn(sde, model, labels), 1.0)
    x, _ = sample(score_fn, sde, (len(labels), 2), "dpm_solver", steps=20, order=3,
                  generator=torch.Generator().manual_seed(1))
    in_class = (mixture.posterior(x).argmax(1) == labels).double().mean().item()
    assert in_class >= MIN_GUIDED_CLASS_FRACTION, in_class
    assert all(p.grad is None for p in model.parameters())  # the gradient is taken in x only


def test_sample_mode_with_labels_and_both_guidances_in_process(toy_classifier):
    """A conditional toy model trained a few steps, then --mode sample with labels, CFG and classifier guidance."""
    _, classifier_dir = toy_classifier
    config = toy_config()
    config.model.num_classes, config.training.label_dropout = 4, 0.2
    config.model.nf, config.model.num_res_blocks = 32, 1
    config.training.n_iters, config.training.snapshot_freq, config.training.snapshot_sampling = 4, 4, False
    config.training.snapshot_freq_for_preemption, config.training.eval_freq = 4, 2
    config.eval.num_samples, config.sampling.steps, config.sampling.method = 40, 4, "dpm_solver"
    workdir = classifier_dir  # the classifier lives in workdir/classifier
    run_lib.train(config, workdir)
    config.sampling.class_labels, config.sampling.guidance_scale, config.sampling.classifier_scale = (1, 3), 1.5, 1.0
    run_lib.sample(config, workdir, "pictures")
    saved = np.load(workdir / "pictures" / "checkpoint_1_dpm_solver_nfe5_labels1-3_w1.5_cls1.npz")
    assert saved["samples"].shape == (40, 2) and np.isfinite(saved["samples"]).all()
    assert (saved["labels"] == np.repeat([1, 3], 20)).all()
    assert (workdir / "pictures" / "checkpoint_1_dpm_solver_nfe5_labels1-3_w1.5_cls1.png").stat().st_size > 0
    run_lib.evaluate(config, workdir)  # labels of the test split, both guidances
    report = json.loads((workdir / "eval" / "report_1.json").read_text())
    assert report["conditioning"] == {"labels": "test split, in order", "guidance_scale": 1.5,
                                      "classifier_scale": 1.0}
    assert report["num_samples"] == 40 and np.isfinite([report["eval_loss"], report["sliced_w2"]]).all()


def test_classifier_guidance_without_a_trained_classifier_says_what_to_run(tmp_path):
    config = toy_config()
    config.sampling.classifier_scale = 1.0
    with pytest.raises(CheckpointError, match="train_classifier"):
        run_lib.make_conditioning(config, VPSDE(), None, ToyDataset("gmm", batch_size=8, seed=0), tmp_path, "cpu")


# --------------------------------------------------------------------------------------------------
# Through main.py
# --------------------------------------------------------------------------------------------------
TINY = {"training.batch_size": 16, "training.n_iters": 3, "training.snapshot_freq": 3,
        "training.snapshot_freq_for_preemption": 3, "training.eval_freq": 3, "training.log_freq": 1,
        "sampling.steps": 3, "eval.num_samples": 20, "device": "cpu"}


def test_main_samples_a_per_class_grid_from_a_conditional_model(tmp_path):
    """Three training steps of the conditional digits model (in process: a second interpreter start would double the
    cost), then `python main.py --mode sample` with per-class labels and guidance writes the grid."""
    config = vp_digits_cond.get_config()
    for key, value in TINY.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    run_lib.train(config, tmp_path)
    flags = [f"--config.{key}={value}" for key, value in TINY.items()]
    cmd = [sys.executable, "main.py", "--config", "configs/vp_digits_cond.py", "--mode", "sample", "--workdir",
           str(tmp_path), *flags, "--config.sampling.class_labels=per_class", "--config.sampling.guidance_scale=2"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    stem = tmp_path / "samples" / "checkpoint_1_pc_nfe4_per_class_w2"
    assert (np.load(f"{stem}.npz")["labels"] == np.repeat(np.arange(10), 2)).all()  # 20 samples: 2 per digit
    from PIL import Image
    with Image.open(f"{stem}.png") as grid:  # 10 rows of 2 images (8 px + 1 px padding each), enlarged
        assert grid.size[1] / grid.size[0] == pytest.approx((10 * 9 + 1) / (2 * 9 + 1))
