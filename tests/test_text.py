"""Text conditioning: the word tokenizer, the from-scratch text encoder, cross-attention blocks (against a written-out
softmax(QKᵀ/√d)V), caption generation from class labels, caption files, and the frozen CLIP text encoder (a tiny
random CLIP model and tokenizer built offline)."""
from __future__ import annotations

import json
import math
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sde_diffusion.errors import DatasetError
from sde_diffusion.models.cross_attention import CrossAttention2d, CrossAttentionTokens
from sde_diffusion.models.text_encoder import CLIPTextEncoder, TextEncoder
from sde_diffusion.text import (BOS, DIGIT_PHRASINGS, MIXTURE_PHRASINGS, PAD, UNK, ClassPhrasings, WordTokenizer,
                                caption_words, read_captions)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

ROOT = Path(__file__).resolve().parents[1]


def perturb_(module: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Random values for every parameter (the zero-initialised output projections included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# --------------------------------------------------------------------------------------------------
# WordTokenizer
# --------------------------------------------------------------------------------------------------
def test_tokenizer_ids_unknown_words_padding_and_truncation():
    tok = WordTokenizer.fit(["A handwritten 3!", "the digit 3", "a digit"], max_length=5)
    assert caption_words("A handwritten 3!") == ["a", "handwritten", "3"]
    assert tok.words == ("3", "a", "digit", "handwritten", "the")  # sorted; ids 3, 4, 5, 6, 7
    assert tok.vocab_size == 8 and (PAD, BOS, UNK) == (0, 1, 2)
    ids = tok(["The DIGIT 3", "a zebra", "", "a handwritten digit the 3 a"])
    assert ids.dtype == torch.long
    assert ids.tolist() == [[BOS, 7, 5, 3, PAD], [BOS, 4, UNK, PAD, PAD], [BOS, PAD, PAD, PAD, PAD], [BOS, 4, 6, 5, 7]]
    assert tok([]).shape == (0, 5)
    with pytest.raises(TypeError, match="wrap a single caption in a list"):
        tok("a digit")


def test_tokenizer_state_round_trip():
    tok = WordTokenizer.fit(DIGIT_PHRASINGS.all_captions(), max_length=7)
    state = tok.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain Python types
    again = WordTokenizer.from_state_dict(state)
    captions = DIGIT_PHRASINGS.all_captions(held_out=True)
    assert torch.equal(again(captions), tok(captions)) and again.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="max_length"):
        WordTokenizer.from_state_dict({"words": ["a"]})


# --------------------------------------------------------------------------------------------------
# TextEncoder
# --------------------------------------------------------------------------------------------------
def test_text_encoder_mask_pooled_and_padding_invariance():
    captions = ["a handwritten 3", "the digit 7 written by hand", ""]
    short, long = WordTokenizer.fit(captions, max_length=8), WordTokenizer.fit(captions, max_length=16)
    encoder = TextEncoder(short.vocab_size, dim=32, depth=2, num_heads=4, max_length=16).eval()
    a, b = encoder(short(captions)), encoder(long(captions))
    assert a.context.shape == (3, 8, 32) and b.context.shape == (3, 16, 32) and a.pooled.shape == (3, 32)
    assert a.mask.sum(1).tolist() == [4, 7, 1]  # BOS + words; the empty caption keeps its BOS
    assert torch.equal(b.mask[:, :8], a.mask) and not b.mask[:, 8:].any()
    real = a.mask
    torch.testing.assert_close(b.context[:, :8][real], a.context[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.pooled, a.pooled, atol=1e-5, rtol=1e-5)
    manual = torch.stack([a.context[i][real[i]].mean(0) for i in range(3)])
    torch.testing.assert_close(a.pooled, manual)
    other = encoder(short(["a handwritten 7", "the digit 7 written by hand", ""]))  # not a constant map
    assert (other.context[0, 3] - a.context[0, 3]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="max_length"):
        encoder(torch.ones(1, 17, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# Cross-attention
# --------------------------------------------------------------------------------------------------
MASK = torch.tensor([[True, True, False, True], [True, False, False, False]])


def cross_inputs(dtype=torch.float64, channels: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 3, 3, generator=g, dtype=dtype)
    context = torch.randn(2, 4, 6, generator=g, dtype=dtype)
    return x, context


def reference_cross_attention_2d(block: CrossAttention2d, x, context, mask, groups: int, heads: int):
    """GroupNorm, then per sample and head softmax(q kᵀ/√d) v over the kept keys, the output map, the residual."""
    B, C, H, W = x.shape
    xg = x.reshape(B, groups, -1)
    normed = (xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + 1e-6)
    normed = normed.reshape(B, C, H * W) * block.norm.weight[:, None] + block.norm.bias[:, None]
    tokens = normed.transpose(1, 2)  # (B, HW, C)
    Wkv, bkv = block.attn.to_kv.weight, block.attn.to_kv.bias
    Wq, bq, Wk, bk, Wv, bv = block.attn.to_q.weight, block.attn.to_q.bias, Wkv[:C], bkv[:C], Wkv[C:], bkv[C:]
    d = C // heads
    out = torch.zeros(B, H * W, C, dtype=x.dtype)
    for b in range(B):
        keep = mask[b].nonzero().flatten()
        for h in range(heads):
            rows = slice(h * d, (h + 1) * d)
            q = tokens[b] @ Wq[rows].T + bq[rows]
            k = context[b, keep] @ Wk[rows].T + bk[rows]
            v = context[b, keep] @ Wv[rows].T + bv[rows]
            scores = q @ k.T / math.sqrt(d)
            weights = torch.exp(scores - scores.max(1, keepdim=True).values)
            out[b, :, rows] = (weights / weights.sum(1, keepdim=True)) @ v
    y = out @ block.attn.proj_out.weight.T + block.attn.proj_out.bias
    return x + y.transpose(1, 2).reshape(B, C, H, W)


def test_cross_attention_2d_matches_written_out_attention():
    block = perturb_(CrossAttention2d(8, 6, num_heads=2).double())  # 8 channels → ncsnpp_groups: 2 groups
    x, context = cross_inputs()
    with torch.no_grad():
        expected = reference_cross_attention_2d(block, x, context, MASK, groups=2, heads=2)
        torch.testing.assert_close(block(x, context, MASK), expected, atol=1e-12, rtol=1e-10)
        unmasked = reference_cross_attention_2d(block, x, context, torch.ones_like(MASK), groups=2, heads=2)
        torch.testing.assert_close(block(x, context), unmasked, atol=1e-12, rtol=1e-10)
        assert (unmasked - expected).abs().max() > 1e-3  # the mask matters


@pytest.mark.parametrize("kind", ["2d", "tokens"])
def test_cross_attention_identity_at_init_masked_keys_ignored_and_gradients(kind):
    x, context = cross_inputs(channels=8)
    if kind == "tokens":
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, 9, 8) tokens
        block = CrossAttentionTokens(8, 6, num_heads=2).double()
    else:
        block = CrossAttention2d(8, 6, num_heads=2).double()
    assert torch.equal(block(x, context, MASK), x)  # zero output projection: the identity
    perturb_(block)
    changed = torch.where(MASK[..., None], context, 1e3 * torch.randn_like(context))
    out = block(x, context, MASK)
    torch.testing.assert_close(block(x, changed, MASK), out, atol=1e-12, rtol=0)
    assert (block(x, context + 1.0 * MASK[..., None], MASK) - out).abs().max() > 1e-3  # kept keys do matter
    x, context = x.clone().requires_grad_(), context.clone().requires_grad_()
    grads = torch.autograd.grad(block(x, context, MASK).square().sum(), [x, context, *block.parameters()])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads[:1] + grads[2:])
    assert torch.equal(grads[1][~MASK], torch.zeros_like(grads[1][~MASK]))  # no gradient into masked tokens
    assert grads[1][MASK].abs().min() > 0


@pytest.mark.parametrize("kind", ["2d", "tokens"])
def test_cross_attention_double_backward(kind):
    x, context = cross_inputs(channels=4)
    block = perturb_(CrossAttention2d(4, 6, num_heads=2) if kind == "2d" else CrossAttentionTokens(4, 6, 2)).double()
    if kind == "tokens":
        x = x.flatten(2).transpose(1, 2).contiguous()
    x, context = x[:1].clone().requires_grad_(), context[:1].clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, c: block(x, c, MASK[:1]), (x, context))


def test_cross_attention_bf16_autocast():
    x, context = cross_inputs(torch.float32, channels=32)
    block = perturb_(CrossAttention2d(32, 6, num_heads=4), scale=0.2)
    expected = block(x, context, MASK)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, context.bfloat16(), MASK)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=0.1, rtol=0.05)
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(gx).all()


def test_cross_attention_shape_errors():
    block = CrossAttentionTokens(8, 6, 2)
    with pytest.raises(ValueError, match="context_dim=6"):
        block(torch.randn(2, 3, 8), torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="mask must be bool"):
        block(torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.ones(2, 4))


# --------------------------------------------------------------------------------------------------
# Captions from labels
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phrasings", [DIGIT_PHRASINGS, MIXTURE_PHRASINGS], ids=["digits", "mixture"])
def test_class_phrasings(phrasings: ClassPhrasings):
    labels = torch.arange(200) % phrasings.num_classes
    draw = lambda seed, held_out=False: phrasings.captions(labels, torch.Generator().manual_seed(seed), held_out)
    assert draw(3) == draw(3) and draw(3) != draw(4)
    for held_out in (False, True):
        captions = draw(5, held_out)
        assert [phrasings.prompt_class(c) for c in captions] == labels.tolist()
        assert set(captions) <= set(phrasings.all_captions(held_out))
        assert len(set(captions)) > len(phrasings.templates(held_out)) * phrasings.num_classes // 2  # varied
        everything = phrasings.all_captions(held_out)
        assert [phrasings.prompt_class(c) for c in everything] == phrasings.all_labels(held_out)
    assert not set(phrasings.all_captions(False)) & set(phrasings.all_captions(True))
    assert not set(phrasings.train_templates) & set(phrasings.held_out_templates)
    # held-out phrasings recombine training words: at most one word unseen in training per caption
    tokenizer = WordTokenizer.fit(phrasings.all_captions(False), max_length=32)
    unknown = (tokenizer(phrasings.all_captions(True)) == UNK).sum(1)
    assert unknown.max() <= 1 and unknown.float().mean() < 0.5
    assert phrasings.prompt_class("nothing in particular") is None


def test_class_phrasings_validation():
    names = [("red",), ("blue",)]
    with pytest.raises(ValueError, match="exactly one"):
        ClassPhrasings(names, ["a dot"], ["the {}"])
    with pytest.raises(ValueError, match="unseen in training"):
        ClassPhrasings(names, ["a {} dot"], ["A {} dot!"])
    with pytest.raises(ValueError, match="does not name that class alone"):
        ClassPhrasings(names, ["a red {}"], ["the {}"])
    with pytest.raises(ValueError, match="not classes"):
        ClassPhrasings(names, ["a {}"], ["the {}"]).captions(torch.tensor([2]), torch.Generator())
    assert DIGIT_PHRASINGS.prompt_class("a handwritten 7") == 7 and MIXTURE_PHRASINGS.prompt_class("top right") == 3


# --------------------------------------------------------------------------------------------------
# Caption files
# --------------------------------------------------------------------------------------------------
def test_read_captions_csv_and_json(tmp_path):
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text('name,caption\ncats/001.png,"a cat, sleeping"\n002.png,a dog\n')
    names = ["cats/001.png", "dogs/002.png"]  # the second matched by its unique bare name
    assert read_captions(csv_file, names) == ["a cat, sleeping", "a dog"]
    as_object = tmp_path / "captions.json"
    as_object.write_text(json.dumps({"cats/001.png": "a cat", "dogs/002.png": "a dog"}))
    assert read_captions(as_object, names) == ["a cat", "a dog"]
    as_records = tmp_path / "records.json"
    as_records.write_text(json.dumps([{"name": "001.png", "caption": "x"}, {"name": "dogs/002.png", "caption": "y"}]))
    assert read_captions(as_records, names) == ["x", "y"]


def test_read_captions_errors(tmp_path):
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text("name,caption\na/1.png,one\nb/1.png,other one\n")
    names = ["c/1.png"] + [f"img_{i}.png" for i in range(7)]  # 1.png is ambiguous: two captions have that name
    with pytest.raises(DatasetError, match=r"8 of 8 images have no caption .*c/1\.png, img_0\.png.*\.\.\."):
        read_captions(csv_file, names)
    with pytest.raises(DatasetError, match="does not exist"):
        read_captions(tmp_path / "missing.csv", names)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,text\na.png,x\n")
    with pytest.raises(DatasetError, match="name,caption"):
        read_captions(bad, ["a.png"])


# --------------------------------------------------------------------------------------------------
# CLIPTextEncoder (a tiny random CLIP built offline)
# --------------------------------------------------------------------------------------------------
def test_text_modules_do_not_import_transformers():
    code = ("import sys, sde_diffusion.text, sde_diffusion.models.text_encoder; "
            "sys.exit('transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def save_tiny_clip(model_dir: Path, tokenizer_dir: Path, seed: int = 0):
    """A 2-layer, width-32 CLIP text model and a character-level CLIP tokenizer (no merges), saved offline."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    chars = [c for c in string.printable if not c.isspace()]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                                           model_max_length=24)
    tokenizer.save_pretrained(tokenizer_dir)
    config = transformers.CLIPTextConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=24,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config).eval()
    model.save_pretrained(model_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    model, tokenizer = save_tiny_clip(folder, folder)
    return folder, model, tokenizer


CAPTIONS = ["a handwritten 7", "the number 0 written by hand", "a picture of a nine"]


def test_clip_features_equal_the_model_outputs(tiny_clip):
    folder, model, tokenizer = tiny_clip
    encoder = CLIPTextEncoder(folder)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the mask cannot be ids ≠ pad
    tokens = encoder.tokenize(CAPTIONS)
    expected = tokenizer(CAPTIONS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    assert tokens.shape == (3, 24) and torch.equal(tokens, expected.input_ids)
    features = encoder(tokens)
    with torch.no_grad():
        out = model(input_ids=expected.input_ids)
    assert encoder.dim == 32 and features.context.shape == (3, 24, 32)
    torch.testing.assert_close(features.context, out.last_hidden_state, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(features.pooled, out.pooler_output, atol=1e-6, rtol=1e-6)
    assert torch.equal(features.mask, expected.attention_mask.bool())
    assert encoder.tokenize(CAPTIONS[:1], max_length=8).shape == (1, 8)
    assert not features.context.requires_grad


def test_clip_is_frozen_and_hidden_from_a_containing_module(tiny_clip):
    folder, _, _ = tiny_clip

    class Conditioned(nn.Module):
        def __init__(self):
            super().__init__()
            self.text = CLIPTextEncoder(folder)
            self.head = nn.Linear(32, 1)

    net = Conditioned().train()
    assert [name for name, _ in net.named_parameters()] == ["head.weight", "head.bias"]
    assert set(net.state_dict()) == {"head.weight", "head.bias"}
    clip = net.text.clip
    assert not clip.training and not any(p.requires_grad for p in clip.parameters())
    net.to(torch.float64)
    assert net.head.weight.dtype == torch.float64 and all(p.dtype == torch.float64 for p in clip.parameters())
    assert net.text(net.text.tokenize(CAPTIONS)).context.dtype == torch.float64
    net.float()
    assert all(p.dtype == torch.float32 for p in clip.parameters())


def test_clip_pipeline_layout_and_fingerprint(tiny_clip, tmp_path):
    folder, _, _ = tiny_clip
    save_tiny_clip(tmp_path / "pipe" / "text_encoder", tmp_path / "pipe" / "tokenizer", seed=0)
    save_tiny_clip(tmp_path / "other", tmp_path / "other", seed=1)
    flat, pipe, other = CLIPTextEncoder(folder), CLIPTextEncoder(tmp_path / "pipe"), CLIPTextEncoder(tmp_path / "other")
    fingerprint = flat.fingerprint()
    assert len(fingerprint) == 64 and CLIPTextEncoder(folder).fingerprint() == fingerprint
    assert pipe.fingerprint() == fingerprint  # same weights, same file names
    assert other.fingerprint() != fingerprint
    tokens = flat.tokenize(CAPTIONS)
    torch.testing.assert_close(pipe(tokens).context, flat(tokens).context)


def test_clip_missing_folder_and_files(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed")
    with pytest.raises(ValueError, match=r"does not exist: expected config\.json"):
        CLIPTextEncoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no model files and tokenizer files"):
        CLIPTextEncoder(tmp_path / "empty")
