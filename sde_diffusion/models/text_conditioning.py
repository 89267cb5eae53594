"""Text conditioning of a score network: captions → token ids → text features (context, mask, pooled).

A text-conditioned network takes token ids (B, L) where a class-conditional one takes labels (B,): its
`TextConditioning` turns them into `TextFeatures`, whose pooled vector is added to the noise embedding and
whose per-token context the network's cross-attention blocks attend to. The null condition (classifier-free
guidance, caption dropout) is the empty caption.

config.model.text.encoder:
- 'scratch': a small transformer (`text.TextEncoder`) trained with the network, on a word tokenizer fitted to the
  training captions (`training_captions`); the vocabulary travels in the network's state dict (extra state);
- 'clip': a frozen Hugging Face CLIP text model with its tokenizer from the local folder model.text.pretrained,
  kept out of the state dict; the state dict records its fingerprint, checked when loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import text
from ..errors import ConfigError
from . import layers
from .text_encoder import CLIPTextEncoder, TextEncoder, TextFeatures, clip_folders

TEXT_ENCODERS = ("none", "scratch", "clip")
CAPTION_PHRASINGS = {"digits": text.DIGIT_PHRASINGS, "gmm": text.MIXTURE_PHRASINGS}  # data.captions='labels'


def text_conditioned(config) -> bool:
    return config.model.text.encoder != "none"


def label_phrasings(config) -> text.ClassPhrasings:
    """The phrasings that turn data.dataset's class labels into captions (data.captions='labels')."""
    name = config.data.dataset.lower()
    if name not in CAPTION_PHRASINGS:
        raise ConfigError(f"data.captions='labels' makes captions from class labels, which exist for "
                          f"{sorted(CAPTION_PHRASINGS)}, not data.dataset={config.data.dataset!r}: give a captions "
                          "file (CSV name,caption or JSON) in data.captions")
    return CAPTION_PHRASINGS[name]


def training_captions(config) -> List[str]:
    """Every caption training can draw, to fit the scratch tokenizer's vocabulary: the training phrasings of the
    labels (never the held-out ones), or all captions of the captions file."""
    captions = config.data.captions
    if captions == "labels":
        return label_phrasings(config).all_captions(held_out=False)
    return list(text.load_caption_table(Path(captions).expanduser()).values())


def context_dim(config) -> int:
    """The width of the text features the network's cross-attention receives."""
    t = config.model.text
    if t.encoder == "clip":
        folder, _ = clip_folders(t.pretrained)
        return json.loads((folder / "config.json").read_text())["hidden_size"]
    return t.dim


def check_config(config) -> None:
    """model.text, data.captions, training.caption_dropout and sampling.prompt; raises ConfigError."""
    t, d = config.model.text, config.data
    if t.encoder not in TEXT_ENCODERS:
        raise ConfigError(f"model.text.encoder={t.encoder!r} is not one of {list(TEXT_ENCODERS)}")
    if not 0.0 <= config.training.caption_dropout < 1.0:
        raise ConfigError(f"training.caption_dropout must lie in [0, 1), got {config.training.caption_dropout}")
    if t.encoder == "none":
        for key, value, default in (("data.captions", d.captions, "none"), ("sampling.prompt", config.sampling.prompt,
                                                                             None)):
            if value != default:
                raise ConfigError(f"{key}={value!r} needs a text-conditioned network: set model.text.encoder to "
                                  "'scratch' (trained with the network) or 'clip' (with model.text.pretrained)")
        return
    if config.model.num_classes:
        raise ConfigError("model.text.encoder and model.num_classes both condition the network: use one (captions "
                          "made from labels: data.captions='labels', model.num_classes=0)")
    if not config.model.conditional:
        raise ConfigError("a text-conditioned network adds the caption to the noise embedding: set "
                          "model.conditional=True")
    if d.captions == "none":
        raise ConfigError("model.text.encoder is set but data.captions='none': set data.captions='labels' (captions "
                          "from class labels) or to a captions file (CSV name,caption or JSON)")
    if d.captions == "labels":
        label_phrasings(config)
    elif d.dataset.lower() != "folder":
        raise ConfigError(f"data.captions={d.captions!r} names a captions file, which captions the images of folder "
                          f"data (data.dataset='folder'), not {d.dataset!r}: use data.captions='labels'")
    elif not Path(d.captions).expanduser().is_file():
        raise ConfigError(f"data.captions={d.captions!r} is neither 'labels' nor an existing captions file (CSV "
                          "name,caption or JSON)")
    if config.sampling.classifier_scale:
        raise ConfigError("sampling.classifier_scale > 0 guides by class labels; a text-conditioned network is "
                          "guided by its prompt (sampling.guidance_scale): set sampling.classifier_scale=0")
    if t.encoder == "scratch":
        for key in ("dim", "depth", "num_heads", "max_length"):
            if t[key] < 1:
                raise ConfigError(f"model.text.{key} must be ≥ 1, got {t[key]}")
        if t.dim % t.num_heads:
            raise ConfigError(f"model.text.num_heads={t.num_heads} must divide model.text.dim={t.dim}")
    else:
        if not t.pretrained:
            raise ConfigError("model.text.encoder='clip' needs model.text.pretrained: a local folder with a CLIP "
                              "text model and its tokenizer")
        try:
            clip_folders(t.pretrained)
        except ValueError as err:
            raise ConfigError(f"model.text.pretrained: {err}") from err


class TextConditioning(nn.Module):
    """tokens (B, L) → (TextFeatures, pooled projection (B, emb_dim) to add to the noise embedding).

    `tokenize(captions)` gives the token ids this network takes; `null_tokens(n)` those of the empty caption."""

    def __init__(self, config, emb_dim: int):
        super().__init__()
        t = config.model.text
        self.kind = t.encoder
        if self.kind == "clip":
            self.encoder = CLIPTextEncoder(t.pretrained)
            self.tokenizer = None
        else:
            self.tokenizer = text.WordTokenizer.fit(training_captions(config), t.max_length)
            self.encoder = TextEncoder(self.tokenizer.vocab_size, t.dim, t.depth, t.num_heads, t.max_length)
        self.dim = self.encoder.dim
        self.pooled_proj = layers.linear(self.dim, emb_dim)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """(n, L) int64 token ids on the host."""
        if self.kind == "clip":
            return self.encoder.tokenize(list(captions))
        return self.tokenizer(list(captions))

    def null_tokens(self, n: int, device) -> torch.Tensor:
        """The empty caption's ids, (n, L) on device."""
        return self.tokenize([""]).to(device).expand(n, -1)

    def forward(self, tokens: Optional[torch.Tensor], batch: int, device) -> Tuple[TextFeatures, torch.Tensor]:
        """tokens (B, L) int64, or None for the empty caption."""
        if tokens is None:
            tokens = self.null_tokens(batch, device)
        features = self.encoder(tokens.to(device))
        return features, self.pooled_proj(features.pooled)

    def get_extra_state(self):
        if self.kind == "clip":
            return {"clip_fingerprint": self.encoder.fingerprint()}
        return {"tokenizer": self.tokenizer.state_dict()}

    def set_extra_state(self, state) -> None:
        if self.kind == "clip":
            found = state.get("clip_fingerprint") if isinstance(state, dict) else None
            if found != self.encoder.fingerprint():
                raise RuntimeError(f"the checkpoint's network was trained with another CLIP text encoder (weights "
                                   f"{str(found)[:12]}…, model.text.pretrained has {self.encoder.fingerprint()[:12]}…)")
            return
        if not isinstance(state, dict) or "tokenizer" not in state:
            raise RuntimeError("the checkpoint's text conditioning holds no tokenizer: it was not trained with "
                               "model.text.encoder='scratch'")
        tokenizer = text.WordTokenizer.from_state_dict(state["tokenizer"])
        if tokenizer.vocab_size != self.tokenizer.vocab_size:
            raise RuntimeError(f"the checkpoint's tokenizer has {tokenizer.vocab_size} tokens, this network's "
                               f"{self.tokenizer.vocab_size}: the captions differ from those it was trained on")
        self.tokenizer = tokenizer


def build_text_conditioning(config, emb_dim: int) -> Optional[TextConditioning]:
    """The network's TextConditioning, or None without a text encoder."""
    return TextConditioning(config, emb_dim) if text_conditioned(config) else None


class LabelCaptions:
    """Class labels → caption token ids, on the labels' device and without reading them back: every caption of
    each class (a phrasings' training or held-out set) is tokenized once into a table (classes, captions, L), and
    a label draws one row of its class uniformly (`generator`: a generator on the labels' device, or None for the
    global stream)."""

    def __init__(self, phrasings: text.ClassPhrasings, tokenize, held_out: bool = False):
        captions, labels = phrasings.all_captions(held_out), phrasings.all_labels(held_out)
        per_class = [[c for c, y in zip(captions, labels) if y == k] for k in range(phrasings.num_classes)]
        most = max(len(rows) for rows in per_class)
        tokens = [tokenize(rows + rows[:1] * (most - len(rows))) for rows in per_class]  # pad with a repeat
        self.table = torch.stack(tokens)  # (classes, most, L)
        self.counts = torch.tensor([len(rows) for rows in per_class])

    def __call__(self, labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.table.device != labels.device:
            self.table, self.counts = self.table.to(labels.device), self.counts.to(labels.device)
        u = torch.rand(labels.shape, generator=generator, device=labels.device)
        pick = (u * self.counts[labels]).long().clamp_max(self.table.shape[1] - 1)
        return self.table[labels, pick]

    def train_batch(self, dataset, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next training batch on device and a caption of each image's label (the global random stream)."""
        x, labels = dataset.train_batch(with_labels=True)
        return x.to(device), self(labels.to(device))

    def split_tokens(self, dataset, split: str, generator: torch.Generator) -> torch.Tensor:
        """A caption (token ids (N, L)) for every image of the split, in order, drawn by `generator`."""
        labels = dataset.test_labels if split == "test" else dataset.train_labels
        return self(labels.to(generator.device), generator)


class ImageCaptions:
    """The captions of a captions file (data.captions; `text.read_captions`) for the images of folder data,
    tokenized once: a table (N, L) per split, rows in the split's order."""

    def __init__(self, dataset, path, tokenize):
        self.tables = {split: tokenize(text.read_captions(path, names))
                       for split, names in (("train", dataset.train_names), ("test", dataset.test_names))}

    def train_batch(self, dataset, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next training batch on device and its images' captions."""
        x, indices = dataset.train_batch(with_indices=True)
        if self.tables["train"].device != indices.device:
            self.tables["train"] = self.tables["train"].to(indices.device)
        return x.to(device), self.tables["train"][indices].to(device)

    def split_tokens(self, dataset, split: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.tables[split]


def dataset_captions(config, model: nn.Module, dataset):
    """Where a text-conditioned network's captions come from: LabelCaptions (data.captions='labels') or the
    ImageCaptions of a captions file; None for other networks."""
    from .score_fn import unwrap
    conditioning = getattr(unwrap(model), "text", None)
    if conditioning is None:
        return None
    if config.data.captions == "labels":
        return LabelCaptions(label_phrasings(config), conditioning.tokenize)
    return ImageCaptions(dataset, Path(config.data.captions).expanduser(), conditioning.tokenize)
