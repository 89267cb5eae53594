"""Text-conditioned score networks: captions reach every network (U-Nets and DiT by cross-attention, all by the
noise embedding), the empty caption is the null condition of guidance and caption dropout, the tokenizer travels
in checkpoints, a frozen CLIP stays out of them, and a tiny model trained on captions of the labelled 2-D mixture
follows prompts, held-out phrasings included."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from configs.text_digits import get_config as text_digits_config
from configs.toy_gmm import get_config as toy_config
from sde_diffusion import guidance, sampling
from sde_diffusion.errors import ConfigError, DatasetError
from sde_diffusion.models import create_model, get_score_fn
from sde_diffusion.models.score_fn import null_condition
from sde_diffusion.models.text_conditioning import LabelCaptions
from sde_diffusion.sdes import VPSDE
from sde_diffusion.text import DIGIT_PHRASINGS, MIXTURE_PHRASINGS, caption_words
from sde_diffusion.toy import default_mixture
from sde_diffusion.validation import validate_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
ROOT = Path(__file__).resolve().parents[1]


def set_keys(config, changes):
    """config with each "a.b.c": value of changes set."""
    config.update_from_flattened_dict(changes)
    return config


def digits_text_config(name="ddpm", **changes):
    config = text_digits_config()
    config.model.name = name
    if name == "dit":
        config.model.nf, config.model.patch_size, config.model.depth = 32, 2, 2
    if name == "ncsnpp":
        config.model.nf = 32
    if name == "edm2":
        config.model.nf, config.model.noise_conditioning = 16, "log_sigma"
    return set_keys(config, changes)


def toy_text_config(**changes):
    config = toy_config()
    config.model.text.encoder, config.data.captions = "scratch", "labels"
    config.model.text.dim, config.model.text.depth, config.model.text.num_heads = 32, 1, 2
    config.model.nf, config.model.num_res_blocks = 64, 2
    return set_keys(config, changes)


@pytest.mark.parametrize("name", ["ddpm", "ncsnpp", "dit", "edm2", "mlp"])
def test_every_network_follows_the_caption_and_the_empty_caption_is_its_null_condition(name):
    config = toy_text_config() if name == "mlp" else digits_text_config(name)
    validate_config(config)
    torch.manual_seed(0)
    model = create_model(config).eval()
    with torch.no_grad():  # off the near-zero initial output (zero-initialised output layers, cross-attention)
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    shape = (3, 2) if name == "mlp" else (3, 1, 8, 8)
    x, t = torch.randn(shape), torch.full((3,), 500.0)
    phrasings = MIXTURE_PHRASINGS if name == "mlp" else DIGIT_PHRASINGS
    tokens = model.text.tokenize([phrasings.all_captions()[k] for k in range(3)])
    with torch.no_grad():
        out = model(x, t, tokens)
        other = model(x, t, tokens.flip(0))
        unconditional = model(x, t)
        null = model(x, t, null_condition(model, 3, "cpu"))
    assert (out - other).abs().max() > 1e-2 * out.abs().max()  # the caption matters
    assert torch.equal(unconditional, null) and null_condition(model, 3, "cpu").shape == tokens.shape
    if name != "mlp":  # cross-attention sits in the network (identity at initialisation)
        assert any("cross" in key for key in model.state_dict())
    state = model.state_dict()
    assert state["text._extra_state"]["tokenizer"]["words"] == list(model.text.tokenizer.words)
    training_words = {w for c in phrasings.all_captions() for w in caption_words(c)}
    held_out_words = {w for c in phrasings.all_captions(held_out=True) for w in caption_words(c)}
    assert set(model.text.tokenizer.words) == training_words and held_out_words - training_words


def test_the_tokenizer_travels_in_the_state_dict_and_a_different_vocabulary_is_refused():
    config = toy_text_config()
    model, fresh = create_model(config), create_model(config)
    model.text.tokenizer.ids["northeast"], model.text.tokenizer.ids["southwest"] = (
        model.text.tokenizer.ids["southwest"], model.text.tokenizer.ids["northeast"])
    words = list(model.text.tokenizer.words)
    words[0], words[1] = words[1], words[0]  # a reordered vocabulary of the same size
    state = model.state_dict()
    state["text._extra_state"] = {"tokenizer": {"words": sorted(words), "max_length": 16}}
    fresh.load_state_dict(state)
    assert fresh.text.tokenizer.words == tuple(sorted(words))
    state["text._extra_state"] = {"tokenizer": {"words": sorted(words)[:-1], "max_length": 16}}
    with pytest.raises(RuntimeError, match="tokens, this network's"):
        fresh.load_state_dict(state)


def test_classifier_free_guidance_with_captions_combines_the_two_scores():
    config = toy_text_config()
    torch.manual_seed(1)
    model, sde = create_model(config).eval(), VPSDE()
    x, t = torch.randn(4, 2), torch.full((4,), 0.4)
    tokens = model.text.tokenize(["the northeast cluster"] * 4)
    with torch.no_grad():
        guided = guidance.guided_score_fn(sde, model, tokens, guidance_scale=2.0)(x, t)
        cond = get_score_fn(sde, model, labels=tokens)(x, t)
        uncond = get_score_fn(sde, model)(x, t)
        one_row = guidance.guided_score_fn(sde, model, tokens[:1], guidance_scale=2.0)(x, t)
    torch.testing.assert_close(guided, 3 * cond - 2 * uncond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_row, guided)


def test_label_captions_draw_every_training_caption_of_the_class_and_caption_dropout_the_empty_one():
    config = toy_text_config()
    model = create_model(config)
    captions = LabelCaptions(MIXTURE_PHRASINGS, model.text.tokenize)
    labels = torch.tensor([0, 1, 2, 3] * 1500)
    tokens = captions(labels, torch.Generator().manual_seed(0))
    rows = {tuple(r) for r in captions.table.flatten(0, 1).tolist()}
    per_class = {k: {tuple(r) for r in tokens[labels == k].tolist()} for k in range(4)}
    for k in range(4):
        assert per_class[k] == {tuple(r) for r in captions.table[k].tolist()}  # all of them, only its class's
    held_out = {tuple(r) for r in LabelCaptions(MIXTURE_PHRASINGS, model.text.tokenize, held_out=True).table
                .flatten(0, 1).tolist()}
    assert not rows & held_out  # training never sees a held-out phrasing
    null = null_condition(model, len(tokens), "cpu")
    dropped = guidance.drop_conditions(tokens, 0.25, null, torch.Generator().manual_seed(1))
    is_null = (dropped == null).all(1)
    assert 0.22 < is_null.double().mean() < 0.28
    assert torch.equal(dropped[~is_null], tokens[~is_null])


@pytest.mark.parametrize("changes,message", [
    ({"sampling.prompt": "a three"}, "sampling.prompt='a three' needs a text-conditioned network"),
    ({"model.text.encoder": "scratch"}, "data.captions='none'"),
    ({"model.text.encoder": "scratch", "data.captions": "labels", "model.num_classes": 4}, "use one"),
    ({"model.text.encoder": "clip", "data.captions": "labels"}, "needs model.text.pretrained"),
    ({"model.text.encoder": "scratch", "data.captions": "labels", "training.caption_dropout": 0.0,
      "sampling.guidance_scale": 1.0}, "caption_dropout > 0"),
])
def test_config_errors_name_the_key(changes, message):
    config = set_keys(toy_config(), changes)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_a_frozen_clip_text_encoder_stays_out_of_the_network_state_and_is_checked_on_load(tmp_path):
    from test_text import save_tiny_clip
    save_tiny_clip(tmp_path / "clip", tmp_path / "clip")
    config = digits_text_config(**{"model.text.encoder": "clip", "model.text.pretrained": str(tmp_path / "clip")})
    validate_config(config)
    model = create_model(config)
    names = [n for n, _ in model.named_parameters()]
    assert not any("clip" in n for n in names) and any("cross" in n for n in names)
    state = model.state_dict()
    assert set(state["text._extra_state"]) == {"clip_fingerprint"}
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 10.0)
    tokens = model.text.tokenize(["a handwritten 3", "the digit 5"])
    with torch.no_grad():
        assert model(x, t, tokens).shape == x.shape
    state["text._extra_state"] = {"clip_fingerprint": "0" * 64}
    with pytest.raises(RuntimeError, match="another CLIP text encoder"):
        create_model(config).load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# A tiny model trained on the captions of the labelled mixture
# --------------------------------------------------------------------------------------------------
TOY_STEPS = 600  # about 15 s on one core; measured ≥ 0.985 in every mode, held-out phrasings included
PER_CAPTION = 40  # samples per caption


@pytest.fixture(scope="module")
def toy_text_model(tmp_path_factory):
    from sde_diffusion.jobs import builder
    from sde_diffusion.jobs import train as train_job
    from sde_diffusion.checkpoints import load_model_weights
    workdir = tmp_path_factory.mktemp("toy_text")
    config = toy_text_config(**{"training.n_iters": TOY_STEPS, "training.snapshot_freq": TOY_STEPS,
                                "training.snapshot_freq_for_preemption": TOY_STEPS, "training.batch_size": 256,
                                "training.snapshot_sampling": False, "training.eval_freq": TOY_STEPS,
                                "device": "cpu"})
    train_job.run(config, workdir)
    sde, _, model = builder.build(config, "cpu")
    load_model_weights(workdir / "checkpoints" / "checkpoint_1.pth", model)
    return sde, model.eval()


@pytest.mark.parametrize("held_out", [False, True], ids=["training phrasings", "held-out phrasings"])
def test_a_prompt_for_component_k_puts_its_samples_in_mode_k(toy_text_model, held_out):
    sde, model = toy_text_model
    captions, labels = MIXTURE_PHRASINGS.all_captions(held_out), MIXTURE_PHRASINGS.all_labels(held_out)
    tokens = model.text.tokenize(captions).repeat_interleave(PER_CAPTION, 0)
    wanted = torch.tensor(labels).repeat_interleave(PER_CAPTION)
    with torch.no_grad():
        score_fn = guidance.guided_score_fn(sde, model, tokens, guidance_scale=1.0)
        x, _ = sampling.sample(score_fn, sde, (len(tokens), 2), "dpm_solver", steps=20,
                               generator=torch.Generator().manual_seed(0))
    in_mode = (default_mixture().posterior(x).argmax(1) == wanted).double()
    per_caption = in_mode.reshape(len(captions), PER_CAPTION).mean(1)
    worst = per_caption.argmin()
    assert per_caption.min() >= 0.95, f"{captions[worst]!r}: {per_caption.min():.3f} in its mode"


# --------------------------------------------------------------------------------------------------
# main.py --mode sample with a prompt
# --------------------------------------------------------------------------------------------------
def test_sample_mode_with_a_prompt_writes_the_grid_and_the_npz(tmp_path):
    from sde_diffusion.jobs import train as train_job
    config = digits_text_config(**{"training.n_iters": 2, "training.snapshot_freq": 2, "training.batch_size": 8,
                                   "training.snapshot_freq_for_preemption": 2, "training.log_freq": 1,
                                   "training.eval_freq": 2, "device": "cpu"})
    train_job.run(config, tmp_path)
    cmd = [sys.executable, "main.py", "--config", "configs/text_digits.py", "--mode", "sample", "--workdir",
           str(tmp_path), "--config.sampling.prompt=a handwritten three", "--config.sampling.guidance_scale=2",
           "--config.sampling.steps=3", "--config.eval.num_samples=4", "--config.device=cpu"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stem = "checkpoint_1_pc_nfe4_prompt-a-handwritten-three_w2"
    data = np.load(tmp_path / "samples" / f"{stem}.npz")
    assert str(data["prompt"]) == "a handwritten three"
    assert data["images"].shape == (4, 8, 8, 1) and data["images"].dtype == np.uint8
    assert (tmp_path / "samples" / f"{stem}.png").stat().st_size > 0
    assert json.loads((tmp_path / "config.json").read_text())["model"]["text"]["encoder"] == "scratch"
    from sde_diffusion.jobs import sample as sample_job
    rows = digits_text_config(**{"sampling.class_labels": ("per_class",), "sampling.guidance_scale": 2.0,
                                 "sampling.steps": 2, "eval.num_samples": 20, "device": "cpu"})
    sample_job.run(rows, tmp_path, "rows")
    data = np.load(tmp_path / "rows" / "checkpoint_1_pc_nfe3_per_class_w2.npz")
    assert data["labels"].tolist() == [k for k in range(10) for _ in range(2)] and len(data["images"]) == 20


# --------------------------------------------------------------------------------------------------
# Your own images with a captions file
# --------------------------------------------------------------------------------------------------
def captioned_folder(tmp_path):
    """12 small RGB images, reddish or bluish, and captions.csv naming each one's colour."""
    from PIL import Image
    root = tmp_path / "images"
    root.mkdir()
    rows, rng = ["name,caption"], np.random.default_rng(0)
    for k in range(12):
        colour = "red" if k % 2 == 0 else "blue"
        pixels = rng.integers(0, 60, size=(8, 8, 3), dtype=np.uint8)
        pixels[..., 0 if colour == "red" else 2] += 180
        Image.fromarray(pixels).save(root / f"{k:02d}.png")
        rows.append(f'{k:02d}.png,"a {colour} square, number {k}"')
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def test_a_captions_file_captions_each_image_of_a_folder_in_training_and_sampling(tmp_path):
    from configs.vp_folder_64 import get_config
    from sde_diffusion.data.datasets import get_dataset
    from sde_diffusion.jobs import sample as sample_job
    from sde_diffusion.jobs import train as train_job
    from sde_diffusion.models.text_conditioning import dataset_captions
    from sde_diffusion.text import read_captions
    root = captioned_folder(tmp_path)
    config = set_keys(get_config(), {
        "data.root": str(root), "data.image_size": 8, "data.captions": str(tmp_path / "captions.csv"),
        "data.test_fraction": 0.25, "model.text.encoder": "scratch", "model.text.dim": 32, "model.text.num_heads": 2,
        "model.nf": 32, "model.ch_mult": (1, 2), "model.num_res_blocks": 1, "model.attn_resolutions": (4,),
        "training.batch_size": 4, "training.n_iters": 2, "training.snapshot_freq": 2,
        "training.snapshot_freq_for_preemption": 2, "training.log_freq": 1, "training.eval_freq": 2,
        "training.snapshot_sampling": False, "sampling.steps": 2, "eval.num_samples": 3, "device": "cpu"})
    validate_config(config)
    model, dataset, twin = create_model(config), get_dataset(config), get_dataset(config)
    captions = dataset_captions(config, model, dataset)
    expected = model.text.tokenize(read_captions(tmp_path / "captions.csv", dataset.train_names))
    assert torch.equal(captions.tables["train"], expected) and len(expected) == 9
    x, tokens = captions.train_batch(dataset, "cpu")
    _, indices = twin.train_batch(with_indices=True)  # the same batch order
    assert torch.equal(tokens, expected[indices]) and x.shape == (4, 3, 8, 8)
    assert "red" in model.text.tokenizer.words and "blue" in model.text.tokenizer.words
    train_job.run(config, tmp_path / "run")
    config.sampling.prompt = "a blue square"
    sample_job.run(config, tmp_path / "run", "samples")
    [npz] = (tmp_path / "run" / "samples").glob("*prompt-a-blue-square*.npz")
    assert np.load(npz)["images"].shape == (3, 8, 8, 3)
    (tmp_path / "captions.csv").write_text("name,caption\n00.png,a red square\n")
    with pytest.raises(DatasetError, match=r"of 9 images have no caption in .*captions\.csv: 01\.png"):
        dataset_captions(config, model, get_dataset(config))
