"""Captions: words, the offline tokenizer, captions made from class labels, and caption files.

- `WordTokenizer`: an offline word-level vocabulary fitted on training captions (PAD=0, BOS=1, UNK=2).
- `ClassPhrasings`, `DIGIT_PHRASINGS`, `MIXTURE_PHRASINGS`: captions generated from class labels, with held-out
  templates to test generalisation to unseen phrasings.
- `read_captions`, `load_caption_table`: captions of an image folder from a CSV or JSON file.

The text encoders that turn token ids into features live in sde_diffusion/models/text_encoder.py.
"""
from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .errors import DatasetError

Tensor = torch.Tensor
PathLike = Union[str, Path]

PAD, BOS, UNK = 0, 1, 2  # special token ids of WordTokenizer; words follow from id NUM_SPECIAL on
NUM_SPECIAL = 3
WORD = re.compile(r"[^\W_]+")  # a run of letters and digits


def caption_words(caption: str) -> List[str]:
    """Lower-case alphanumeric runs: "A handwritten 3!" → ["a", "handwritten", "3"]."""
    return WORD.findall(caption.lower())


def check_captions(captions: Sequence[str], what: str) -> List[str]:
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"{what} takes a list of caption strings, got {type(captions).__name__}"
                        + (f" {captions!r}: wrap a single caption in a list" if isinstance(captions, str) else ""))
    return list(captions)


# --------------------------------------------------------------------------------------------------
# Word-level tokenizer
# --------------------------------------------------------------------------------------------------
class WordTokenizer:
    """Captions → (n, max_length) token ids: BOS, then one id per word (UNK for words not seen in fitting),
    truncated to max_length, PAD after. The vocabulary is the sorted set of fitted words, ids NUM_SPECIAL + index."""

    def __init__(self, words: Sequence[str], max_length: int = 16):
        words = list(words)
        if words != sorted(set(words)) or any(caption_words(w) != [w] for w in words):
            raise ValueError("WordTokenizer words must be sorted, unique, lower-case alphanumeric words: build it "
                             "with WordTokenizer.fit(captions)")
        if max_length < 1:
            raise ValueError(f"WordTokenizer max_length={max_length} must be ≥ 1 (room for BOS)")
        self.words, self.max_length = tuple(words), int(max_length)
        self.ids: Dict[str, int] = {w: NUM_SPECIAL + i for i, w in enumerate(words)}

    @classmethod
    def fit(cls, captions: Sequence[str], max_length: int = 16) -> "WordTokenizer":
        """The vocabulary of every word in captions (fit on the training captions only)."""
        captions = check_captions(captions, "WordTokenizer.fit")
        return cls(sorted({w for c in captions for w in caption_words(c)}), max_length)

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + len(self.words)

    def encode(self, caption: str) -> List[int]:
        ids = [BOS] + [self.ids.get(w, UNK) for w in caption_words(caption)]
        ids = ids[:self.max_length]
        return ids + [PAD] * (self.max_length - len(ids))

    def __call__(self, captions: Sequence[str]) -> Tensor:
        """(n, max_length) int64 token ids."""
        captions = check_captions(captions, "WordTokenizer")
        return torch.tensor([self.encode(c) for c in captions], dtype=torch.long).reshape(len(captions),
                                                                                      self.max_length)

    def state_dict(self) -> dict:
        """Plain Python types (a torch checkpoint can hold them); `from_state_dict` rebuilds the tokenizer."""
        return {"words": list(self.words), "max_length": self.max_length}

    @classmethod
    def from_state_dict(cls, state: dict) -> "WordTokenizer":
        missing = {"words", "max_length"} - set(state)
        if missing:
            raise ValueError(f"a WordTokenizer state needs the keys {sorted(missing)}: pass what "
                             f"WordTokenizer.state_dict() returned")
        return cls(state["words"], state["max_length"])

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"


# --------------------------------------------------------------------------------------------------
# Captions from class labels
# --------------------------------------------------------------------------------------------------
def template_key(template: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """The words before and after the template's "{}": templates equal up to case and punctuation match."""
    before, after = template.split("{}")
    return tuple(caption_words(before)), tuple(caption_words(after))


def contains_phrase(words: Sequence[str], phrase: Sequence[str]) -> bool:
    n = len(phrase)
    return any(tuple(words[i:i + n]) == tuple(phrase) for i in range(len(words) - n + 1))


class ClassPhrasings:
    """Captions for class labels: a template (one "{}") filled with a synonym of the class, e.g. "a handwritten {}"
    with ("seven", "7") → "a handwritten 7". names[k] lists the synonyms of class k; the held-out templates, for
    testing generalisation, share no template with the training ones. Every caption names exactly one class."""

    def __init__(self, names: Sequence[Sequence[str]], train_templates: Sequence[str],
                 held_out_templates: Sequence[str]):
        self.names = tuple(tuple(synonyms) for synonyms in names)
        self.train_templates, self.held_out_templates = tuple(train_templates), tuple(held_out_templates)
        if not self.names or not all(self.names) or not all(caption_words(s) for syn in self.names for s in syn):
            raise ValueError("ClassPhrasings names must list at least one synonym (of one word or more) per class")
        for template in self.train_templates + self.held_out_templates:
            if template.count("{}") != 1:
                raise ValueError(f"caption template {template!r} must contain exactly one '{{}}' for the class name")
        if not self.train_templates or not self.held_out_templates:
            raise ValueError("ClassPhrasings needs at least one training and one held-out template")
        seen = {template_key(t) for t in self.train_templates}
        if any(template_key(t) in seen for t in self.held_out_templates):
            raise ValueError(f"held-out templates {[t for t in self.held_out_templates if template_key(t) in seen]} "
                             f"are also training templates: held-out templates must be unseen in training")
        self._phrases = [[caption_words(s) for s in synonyms] for synonyms in self.names]
        for held_out in (False, True):
            for caption, label in zip(self.all_captions(held_out), self.all_labels(held_out)):
                if self.prompt_class(caption) != label:
                    raise ValueError(f"caption {caption!r} of class {label} does not name that class alone: a "
                                     f"template word is also a class name, or two classes share a synonym")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def templates(self, held_out: bool = False) -> Tuple[str, ...]:
        return self.held_out_templates if held_out else self.train_templates

    def captions(self, labels: Tensor, generator: torch.Generator, held_out: bool = False) -> List[str]:
        """One caption per label (n,): a template drawn uniformly from the chosen set and a synonym of the label
        drawn uniformly, both from `generator` (a CPU generator), so a seed gives the same captions."""
        labels = torch.as_tensor(labels).reshape(-1).tolist()
        bad = [y for y in labels if not 0 <= y < self.num_classes]
        if bad:
            raise ValueError(f"labels {bad[:5]} are not classes 0..{self.num_classes - 1} of these phrasings")
        templates = self.templates(held_out)
        which = torch.randint(len(templates), (len(labels),), generator=generator).tolist()
        u = torch.rand(len(labels), generator=generator, dtype=torch.float64).tolist()
        return [templates[t].replace("{}", self.names[y][int(u_i * len(self.names[y]))])
                for y, t, u_i in zip(labels, which, u)]

    def all_captions(self, held_out: bool = False) -> List[str]:
        """Every caption of the chosen template set: for each template, each class, each synonym."""
        return [t.replace("{}", s) for t in self.templates(held_out) for synonyms in self.names for s in synonyms]

    def all_labels(self, held_out: bool = False) -> List[int]:
        """The class of each caption of `all_captions(held_out)`."""
        return [k for _ in self.templates(held_out) for k, synonyms in enumerate(self.names) for _ in synonyms]

    def prompt_class(self, caption: str) -> Optional[int]:
        """The class whose synonym (as whole words) the caption contains, or None when it names none or several."""
        words = caption_words(caption)
        found = {k for k, phrases in enumerate(self._phrases) if any(contains_phrase(words, p) for p in phrases)}
        return found.pop() if len(found) == 1 else None


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# sklearn digits 0..9. Held-out templates recombine training words, with at most one unseen word each.
DIGIT_PHRASINGS = ClassPhrasings(
    names=[(name, str(k)) for k, name in enumerate(DIGIT_NAMES)],
    train_templates=("{}", "a handwritten {}", "the digit {}", "a picture of a {}", "an image of the number {}",
                     "a small drawing of the digit {}", "the number {} written by hand",
                     "a photo of a handwritten digit {}"),
    held_out_templates=("a drawing of the number {}", "the handwritten number {}", "a picture of the digit {}",
                        "an image of a handwritten {}", "a tiny digit {}", "the number {} drawn by hand"))

# The labelled `gmm` mixture (toy.default_mixture): class k is component k, with means (−2, −2), (−2, 2),
# (2, −2), (2, 2), named by where they lie (x to the right, y up).
MIXTURE_PHRASINGS = ClassPhrasings(
    names=[("southwest", "bottom left", "lower left"), ("northwest", "top left", "upper left"),
           ("southeast", "bottom right", "lower right"), ("northeast", "top right", "upper right")],
    train_templates=("{}", "the {} cluster", "a point in the {} corner", "a sample from the {} mode",
                     "the mode in the {}", "a dot at the {} of the square"),
    held_out_templates=("a point from the {} cluster", "the {} corner", "a sample in the {}", "a dot in the {} mode",
                        "the blob at the {}"))


# --------------------------------------------------------------------------------------------------
# Captions of an image folder
# --------------------------------------------------------------------------------------------------
def normalize_name(name: PathLike) -> str:
    """A relative image path in one spelling: forward slashes, no leading './'."""
    return str(PurePosixPath(str(name).replace("\\", "/")))


def load_caption_table(path: Path) -> Dict[str, str]:
    """{normalized name: caption} from a CSV (header name,caption) or a JSON object or list of records."""
    def add(table: Dict[str, str], name, caption, where: str) -> None:
        if not isinstance(name, str) or not isinstance(caption, str):
            raise DatasetError(f"{path}: {where} needs a text name and caption, got {name!r}, {caption!r}")
        key = normalize_name(name)
        if table.get(key, caption) != caption:
            raise DatasetError(f"{path}: {where} gives {name!r} a second, different caption: keep one per image")
        table[key] = caption

    table: Dict[str, str] = {}
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"name", "caption"} <= set(reader.fieldnames or ()):
                raise DatasetError(f"{path}: a caption CSV needs the header 'name,caption', got {reader.fieldnames}")
            for row in reader:
                add(table, row["name"], row["caption"], f"line {reader.line_num}")
        return table
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            for name, caption in data.items():
                add(table, name, caption, f"key {name!r}")
        elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
            for i, record in enumerate(data):
                add(table, record.get("name"), record.get("caption"), f"record {i}")
        else:
            raise DatasetError(f"{path}: a caption JSON must be an object {{name: caption}} or a list of "
                               f"{{\"name\": ..., \"caption\": ...}} records")
        return table
    raise DatasetError(f"caption file {path} must be .csv (header name,caption) or .json")


def read_captions(path: PathLike, names: Sequence[PathLike]) -> List[str]:
    """The caption of each image in `names` (paths relative to the data folder), from a CSV with header
    `name,caption` or a JSON object {name: caption} or list of {"name", "caption"} records. An image is matched
    by its relative path, else by its bare file name when that is unique among both the images and the file's
    names. DatasetError listing some images without a caption (and how many) when any lack one."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"caption file {path} does not exist: write a CSV (header name,caption) or a JSON "
                           f"object {{name: caption}} for the images")
    table = load_caption_table(path)
    by_bare: Dict[str, List[str]] = defaultdict(list)
    for key in table:
        by_bare[PurePosixPath(key).name].append(key)
    keys = [normalize_name(n) for n in names]
    image_bare = Counter(PurePosixPath(k).name for k in keys)

    def lookup(key: str) -> Optional[str]:
        if key in table:
            return table[key]
        bare = PurePosixPath(key).name
        matches = by_bare.get(bare, [])
        return table[matches[0]] if len(matches) == 1 and image_bare[bare] == 1 else None

    captions = [lookup(k) for k in keys]
    missing = [k for k, c in zip(keys, captions) if c is None]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetError(f"{len(missing)} of {len(keys)} images have no caption in {path}: {shown}; add a row "
                           f"per image, named by its path relative to the data folder (or its bare file name when "
                           f"unique)")
    return captions
