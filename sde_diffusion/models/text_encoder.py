"""Text encoders: caption token ids → `TextFeatures(context (n, L, dim), mask (n, L) bool, pooled (n, dim))`,
mask True at real tokens.

- `TextEncoder`: a small transformer trained from scratch with the score network (ids of `text.WordTokenizer`).
- `CLIPTextEncoder`: a frozen Hugging Face CLIP text model from a local folder (never downloaded), held outside
  the module tree so that optimizers, EMA, DDP and checkpoints ignore it. `transformers` is imported only when
  one is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checkpoints import files_sha256
from ..text import NUM_SPECIAL, PAD, check_captions
from .cross_attention import masked_attention, merge_heads, split_heads
from .layers import LAYER_NORM_EPS, xavier_linear

Tensor = torch.Tensor
PathLike = Union[str, Path]

EMBED_INIT_STD = 0.02  # token and position embeddings of TextEncoder
MLP_RATIO = 4


class TextFeatures(NamedTuple):
    """What a text encoder gives a network: context (n, L, dim) per-token features, mask (n, L) bool (True = real
    token, BOS included), pooled (n, dim) one vector per caption."""
    context: Tensor
    mask: Tensor
    pooled: Tensor


def masked_mean(context: Tensor, mask: Tensor) -> Tensor:
    """Mean of context (n, L, dim) over the positions where mask (n, L) is True → (n, dim)."""
    weights = mask.to(context.dtype)[..., None]
    return (context * weights).sum(1) / weights.sum(1).clamp_min(1)


# --------------------------------------------------------------------------------------------------
# A text encoder trained from scratch
# --------------------------------------------------------------------------------------------------
class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention over tokens (n, L, dim) in which keys where mask (n, L) is False are ignored."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = xavier_linear(dim, 3 * dim)
        self.proj = xavier_linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(masked_attention(q, k, v, mask)))


class TextLayer(nn.Module):
    """x ← x + attn(norm₁(x), mask);  x ← x + mlp(norm₂(x))   (pre-LayerNorm transformer layer)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = MaskedSelfAttention(dim, num_heads)
        self.norm_2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(xavier_linear(dim, MLP_RATIO * dim), nn.GELU(), xavier_linear(MLP_RATIO * dim, dim))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm_1(x), mask)
        return x + self.mlp(self.norm_2(x))


class TextEncoder(nn.Module):
    """WordTokenizer ids (n, L ≤ max_length) → TextFeatures with context (n, L, dim).

        h = token_embed(ids) + pos_embed[:L];  h = depth × TextLayer(h, mask);  context = LayerNorm(h)

    mask = ids ≠ PAD: PAD tokens are never attended to, so features at real positions do not depend on how many
    PADs follow; pooled is the mean of context over the real tokens.
    """

    def __init__(self, vocab_size: int, dim: int = 128, depth: int = 2, num_heads: int = 4, max_length: int = 16):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"TextEncoder num_heads={num_heads} must divide dim={dim}")
        if vocab_size <= NUM_SPECIAL or depth < 1 or max_length < 1:
            raise ValueError(f"TextEncoder needs vocab_size > {NUM_SPECIAL} (got {vocab_size}), depth ≥ 1 (got "
                             f"{depth}) and max_length ≥ 1 (got {max_length}): pass WordTokenizer.vocab_size")
        self.dim, self.max_length = dim, max_length
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(max_length, dim) * EMBED_INIT_STD)
        nn.init.normal_(self.token_embed.weight, std=EMBED_INIT_STD)
        self.layers = nn.ModuleList(TextLayer(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, tokens: Tensor) -> TextFeatures:
        if tokens.ndim != 2 or tokens.dtype != torch.long or tokens.shape[1] > self.max_length:
            raise ValueError(f"TextEncoder takes (n, L ≤ {self.max_length}) int64 token ids, got {tokens.dtype} "
                             f"{tuple(tokens.shape)}: tokenize with a WordTokenizer of max_length ≤ "
                             f"{self.max_length}")
        mask = tokens != PAD
        h = self.token_embed(tokens) + self.pos_embed[:tokens.shape[1]]
        for layer in self.layers:
            h = layer(h, mask)
        context = self.norm(h)
        return TextFeatures(context, mask, masked_mean(context, mask))


# --------------------------------------------------------------------------------------------------
# A frozen CLIP text encoder from a local folder
# --------------------------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))  # either set


def clip_folders(folder: PathLike) -> Tuple[Path, Path]:
    """(model folder, tokenizer folder) of a CLIP text model: `folder` itself, or its text_encoder/ and tokenizer/
    (a Stable Diffusion pipeline folder). ValueError naming the folder and the expected files otherwise."""
    root = Path(folder)
    expected = ("expected config.json, a weight file (*.safetensors or pytorch_model.bin) and tokenizer files "
                "(tokenizer.json, or vocab.json and merges.txt) together in it, or in its text_encoder/ and "
                "tokenizer/ sub-folders (a Stable Diffusion pipeline folder)")
    if not root.is_dir():
        raise ValueError(f"CLIP text encoder folder {str(root)!r} does not exist: {expected}; nothing is downloaded")
    model, tokenizer = (root / "text_encoder", root / "tokenizer") if (root / "text_encoder").is_dir() else (root, root)
    has_weights = (model / "config.json").is_file() and bool(weight_files(model))
    has_tokenizer = any(all((tokenizer / f).is_file() for f in files) for files in TOKENIZER_FILES)
    if not (has_weights and has_tokenizer):
        lacking = " and ".join(what for what, ok in (("model files", has_weights), ("tokenizer files", has_tokenizer))
                               if not ok)
        raise ValueError(f"CLIP text encoder folder {str(root)!r} has no {lacking}: {expected}")
    return model, tokenizer


def weight_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def through_first(tokens: Tensor, token_id: int) -> Tensor:
    """(n, L) bool: True at every position up to and including the first `token_id` of each row (all if none)."""
    hits = (tokens == token_id).long()
    return hits.cumsum(1) - hits == 0


class CLIPTextEncoder(nn.Module):
    """A frozen CLIP text model and its tokenizer, loaded from a local folder (`clip_folders`) in float32.

    The CLIP model is held outside the module tree: a module containing this one lists none of its weights in
    `parameters()` or `state_dict()` (optimizers, EMA, DDP and checkpoints ignore it), while `.to()`, `.cuda()`,
    `.float()` and the like still move it (`_apply`). It stays in eval mode, without gradients.

        tokenize(captions) → ids (n, L);   forward(ids) → TextFeatures(context = last_hidden_state (n, L, dim),
        mask = up to and including the first EOS (the tokenizer's attention mask), pooled = pooler_output (n, dim))
    """

    def __init__(self, folder: PathLike):
        super().__init__()
        model_folder, tokenizer_folder = clip_folders(folder)
        from transformers import CLIPTextModel, CLIPTokenizer  # only here: the package does not need transformers

        model = CLIPTextModel.from_pretrained(model_folder, local_files_only=True, dtype=torch.float32)
        model.eval().requires_grad_(False)
        object.__setattr__(self, "clip", model)  # not registered as a submodule
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
        self.folder, self.model_folder = Path(folder), model_folder
        self.dim = model.config.hidden_size
        self.max_length = min(self.tokenizer.model_max_length, model.config.max_position_embeddings)
        self._fingerprint: Optional[str] = None

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.clip._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> "CLIPTextEncoder":
        super().train(mode)
        self.clip.eval()  # frozen: dropout and the like stay off
        return self

    def tokenize(self, captions: Sequence[str], max_length: Optional[int] = None) -> Tensor:
        """(n, max_length) int64 ids: BOS, the caption, EOS, padded (max_length defaults to the tokenizer's)."""
        captions = check_captions(captions, "CLIPTextEncoder.tokenize")
        length = max_length or self.max_length
        return self.tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def forward(self, tokens: Tensor) -> TextFeatures:
        device = next(self.clip.parameters()).device
        tokens = tokens.to(device)
        out = self.clip(input_ids=tokens)
        mask = through_first(tokens, self.tokenizer.eos_token_id)
        return TextFeatures(out.last_hidden_state, mask, out.pooler_output)

    def fingerprint(self) -> str:
        """sha256 of the weight files in the model folder (computed once), to record in checkpoints."""
        if self._fingerprint is None:
            self._fingerprint = files_sha256(weight_files(self.model_folder))
        return self._fingerprint

    def extra_repr(self) -> str:
        return f"folder={str(self.folder)!r}, dim={self.dim}, max_length={self.max_length} (frozen)"


