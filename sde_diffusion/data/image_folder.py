"""Your own images as an `ImageDataset`: set data.dataset = "folder" and data.root.

Sources (data.root):
  - a folder: every .png / .jpg / .jpeg / .webp file below it at any depth (hidden files and folders skipped),
    named by its path relative to data.root and taken in sorted order of those names;
  - a .zip of such a folder: the same, named by the paths inside the archive (one top-level folder holding
    everything is stripped, so zipping the folder or its contents gives the same names);
  - a .npy, or an .npz with one array (or one named `images`): uint8 images (N, H, W, C) with C ∈ {1, 3}, or
    (N, H, W) greyscale; image i is named "i".

Each image, once (`preprocess_image`): decode with Pillow (EXIF orientation applied) → 'L' (data.num_channels=1)
or 'RGB' (3) → center crop to the largest square → one resize to data.image_size² with data.resize_filter
(Pillow's antialiased resampling, skipped when the square already has that size) → uint8 (C, S, S).
Grey and RGB images are converted into each other only with data.convert_channels=True (grey = ITU-R 601-2
luma, RGB = grey repeated); alpha is dropped. A square smaller than data.image_size is an error unless
data.allow_upsample=True.

The result is cached (data.cache_dir, default <parent of data.root>/sde_diffusion_cache) as one uint8 array,
keyed by a hash of the source (each file's name, size and modification time; for a .zip its entries' names,
sizes and CRCs) and of the preprocessing keys: later runs load it without decoding, and a changed file, size,
filter or channel mode gives a new entry. Entries are written atomically; stale ones are never read again.

Splits: train/ and test/ top-level folders when the source has them; otherwise the test split holds the
round(N · data.test_fraction) images whose names hash lowest under data.split_seed, which is deterministic,
independent of the order files are found in, and moves at most one image when one is added.

Labels (data.labels): "none"; "folders": the first sub-folder below data.root (below train/ and test/ when
those exist), classes numbered in sorted order of their names; or the path of a labels file: .csv / .txt lines
`name,label` (a first line `name,label` is a header) or a .npy of one integer per source image in source order.
Integer labels are used as class ids; other labels are numbered in sorted order.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import struct
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from ..progress import Progress

from ..checkpoints import load_verified_npz, save_verified_npz
from .image_dataset import ImageDataset
from ..errors import ConfigError, DatasetError, choice, positive

log = logging.getLogger("sde_diffusion")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
ARRAY_EXTENSIONS = (".npy", ".npz")
RESIZE_FILTERS = {"box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
CHANNEL_MODES = {1: "L", 3: "RGB"}  # data.num_channels → Pillow mode
CHANNEL_NAMES = {1: "greyscale (1 channel)", 3: "RGB (3 channels)"}
GREY_MODES = ("1", "L", "LA")
COLOUR_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")
PALETTE_MODES = ("P", "PA")
NUM_LEVELS = 256  # uint8 pixels
CACHE_VERSION = 1  # bump when preprocessing changes what an entry holds
CACHE_FOLDER = "sde_diffusion_cache"
SPLIT_FOLDERS = ("train", "test")
KEY_CHARS = 16  # of a SHA-256 in file and dataset names
EXAMPLES_SHOWN = 5  # names listed in a message
MAX_DECODE_THREADS = 8  # Pillow releases the GIL while decoding and resampling
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(names[:EXAMPLES_SHOWN])
    return shown + (f", … ({len(names)} in all)" if len(names) > EXAMPLES_SHOWN else "")


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Sources: names in order, how to open each, and what the cache key depends on
# --------------------------------------------------------------------------------------------------
def _is_image_name(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return name.lower().endswith(IMAGE_EXTENSIONS) and not any(p.startswith(".") for p in parts)


class FolderSource:
    """Image files below a folder, any depth, sorted by their POSIX paths relative to it."""

    kind = "folder"

    def __init__(self, root: Path):
        self.root = root
        found, others = [], []
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for file in files:
                name = (Path(folder) / file).relative_to(root).as_posix()
                (found if _is_image_name(name) else others).append(name)
        self.names = sorted(found)
        self.others = sorted(others)

    def fingerprint(self) -> list:
        stats = [(self.root / name).stat() for name in self.names]
        return [[name, s.st_size, s.st_mtime_ns] for name, s in zip(self.names, stats)]

    def open(self, i: int) -> Image.Image:
        return Image.open(self.root / self.names[i])

    def describe(self, name: str) -> str:
        return str(self.root / name)


class ZipSource:
    """Image entries of a .zip, sorted by name (one top-level folder holding everything is stripped)."""

    kind = "zip"

    def __init__(self, path: Path):
        self.root = path
        try:
            with zipfile.ZipFile(path) as archive:
                entries = [info for info in archive.infolist() if not info.is_dir()]
        except (zipfile.BadZipFile, OSError) as err:
            raise DatasetError(f"data.root={str(path)!r} is not a readable .zip ({err}): re-create the archive "
                               "or point data.root at the extracted folder") from err
        images = [e for e in entries if _is_image_name(e.filename) and not e.filename.startswith("__MACOSX/")]
        image_names = {e.filename for e in images}
        self.others = sorted(e.filename for e in entries if e.filename not in image_names)
        prefix = self._common_folder([e.filename for e in images])
        self.members = {e.filename[len(prefix):]: e for e in images}
        self.names = sorted(self.members)
        self._local = threading.local()  # one open archive per decoding thread

    @staticmethod
    def _common_folder(names: List[str]) -> str:
        firsts = {PurePosixPath(n).parts[0] for n in names if len(PurePosixPath(n).parts) > 1}
        everything_inside = names and all(len(PurePosixPath(n).parts) > 1 for n in names)
        return f"{firsts.pop()}/" if everything_inside and len(firsts) == 1 else ""

    def fingerprint(self) -> list:
        return [[name, self.members[name].file_size, self.members[name].CRC] for name in self.names]

    def open(self, i: int) -> Image.Image:
        if not hasattr(self._local, "archive"):
            self._local.archive = zipfile.ZipFile(self.root)
        return Image.open(io.BytesIO(self._local.archive.read(self.members[self.names[i]])))

    def describe(self, name: str) -> str:
        return f"{self.root}:{name}"


class ArraySource:
    """uint8 images (N, H, W, C) or (N, H, W) from a .npy or .npz; image i is named str(i)."""

    kind = "array"

    def __init__(self, path: Path):
        self.root = path
        self.images = self._read(path)
        self.names = [str(i) for i in range(len(self.images))]
        self.others: List[str] = []
        self.channels = 1 if self.images.ndim == 3 else self.images.shape[-1]

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        try:
            if path.suffix.lower() == ".npy":
                images = np.load(path, mmap_mode="r")
            else:
                with np.load(path) as archive:
                    keys = list(archive.keys())
                    key = "images" if "images" in keys else keys[0] if len(keys) == 1 else None
                    if key is None:
                        raise DatasetError(f"{path} holds arrays {keys}: keep one array, or name the images "
                                           "'images'")
                    images = archive[key]
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise DatasetError(f"data.root={str(path)!r} is not a readable {path.suffix} array ({err})") from err
        shape = tuple(images.shape)
        if images.dtype != np.uint8:
            raise DatasetError(f"{path} holds {images.dtype} images; expected uint8 pixels 0..255: convert with "
                               "np.clip(np.round(x * 255), 0, 255).astype(np.uint8) (x in [0, 1])")
        if images.ndim == 4 and images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
            raise DatasetError(f"{path} holds images of shape {shape}, which looks like (N, C, H, W); expected "
                               "(N, H, W, C): transpose with x.transpose(0, 2, 3, 1)")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))) or len(images) == 0:
            raise DatasetError(f"{path} holds an array of shape {shape}; expected uint8 images (N, H, W, C) with "
                               "C = 1 or 3, or (N, H, W), N ≥ 1")
        return images

    def fingerprint(self) -> list:
        stat = self.root.stat()
        return [[self.root.name, stat.st_size, stat.st_mtime_ns]]

    def open(self, i: int) -> Image.Image:
        pixels = np.asarray(self.images[i])
        return Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels)

    def describe(self, name: str) -> str:
        return f"{self.root}[{name}]"


def open_source(root) -> "FolderSource | ZipSource | ArraySource":
    """The source at data.root; an error saying what to do when it is missing, of an unknown kind, or empty."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"data.root={str(root)!r} does not exist: point data.root at a folder of images "
                           f"({', '.join(IMAGE_EXTENSIONS)}), a .zip of one, or a .npy/.npz uint8 array (N, H, W, C)")
    path = path.resolve()
    if path.is_dir():
        source = FolderSource(path)
    elif path.suffix.lower() == ".zip":
        source = ZipSource(path)
    elif path.suffix.lower() in ARRAY_EXTENSIONS:
        source = ArraySource(path)
    else:
        raise DatasetError(f"data.root={str(root)!r} is a file but not a .zip, .npy or .npz: point it at a folder "
                           "of images, a .zip of one, or a uint8 array")
    if not source.names:
        others = f"; it holds {len(source.others)} other file(s): {_examples(source.others)}" if source.others else ""
        raise DatasetError(f"data.root={str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched at "
                           f"every depth){others}")
    return source


# --------------------------------------------------------------------------------------------------
# Preprocessing: one image → uint8 (C, S, S)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocessing:
    """The data.* keys that decide the pixels (and the cache entry)."""

    image_size: int
    num_channels: int
    resize_filter: str
    convert_channels: bool
    allow_upsample: bool
    skip_corrupt: bool

    @classmethod
    def from_config(cls, d) -> "Preprocessing":
        if d.resize_filter not in RESIZE_FILTERS:
            raise DatasetError(f"data.resize_filter={d.resize_filter!r} is not one of {sorted(RESIZE_FILTERS)}")
        if d.num_channels not in CHANNEL_MODES:
            raise DatasetError(f"data.num_channels={d.num_channels}: images have 1 (greyscale) or 3 (RGB) channels")
        return cls(d.image_size, d.num_channels, d.resize_filter, d.convert_channels, d.allow_upsample,
                   d.skip_corrupt)


def native_channels(image: Image.Image, name: str) -> int:
    """1 for greyscale, 3 for colour images (alpha not counted); an error for 16-bit or float pixels."""
    if image.mode in GREY_MODES:
        return 1
    if image.mode in COLOUR_MODES:
        return 3
    if image.mode in PALETTE_MODES:
        return 1 if image.palette is not None and image.palette.mode in ("L", "LA") else 3
    raise DatasetError(f"{name} has pixel mode {image.mode!r} (16-bit, integer or floating point), which is not "
                       "supported: save it as an 8-bit greyscale or RGB image")


def center_square(image: Image.Image) -> Image.Image:
    """The largest centered square; an odd leftover pixel goes to the right / bottom side."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def preprocess_image(image: Image.Image, image_size: int, resize_filter: str, num_channels: int) -> np.ndarray:
    """Decoded image → uint8 (num_channels, image_size, image_size): channel mode, center square, one resize."""
    image = center_square(image.convert(CHANNEL_MODES[num_channels]))
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), resample=RESIZE_FILTERS[resize_filter], reducing_gap=None)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


@dataclass
class Decoded:
    """What reading one image gave: its pixels, or why it was not used."""

    pixels: Optional[np.ndarray]  # (C, S, S) uint8; None when not used
    channels: Optional[int] = None  # the image's own channel count; None when unreadable
    size: Optional[Tuple[int, int]] = None  # (width, height) as stored
    problem: Optional[str] = None  # why the file is unreadable
    rejected: Optional[str] = None  # "channels" or "small": why a readable image does not fit the config


def _read_one(source, i: int, spec: Preprocessing) -> Decoded:
    name = source.names[i]
    try:
        with source.open(i) as image:
            channels, size = native_channels(image, source.describe(name)), image.size
            if channels != spec.num_channels and not spec.convert_channels:
                return Decoded(None, channels, size, rejected="channels")
            if min(size) < spec.image_size and not spec.allow_upsample:
                return Decoded(None, channels, size, rejected="small")
            image.load()
            image = ImageOps.exif_transpose(image)
            return Decoded(preprocess_image(image, spec.image_size, spec.resize_filter, spec.num_channels),
                           channels, size)
    except DECODE_ERRORS as err:
        return Decoded(None, problem=f"{type(err).__name__}: {err}")


def _rejection(source, name: str, result: Decoded, spec: Preprocessing, first_match: Optional[str]) -> DatasetError:
    where = source.describe(name)
    if result.rejected == "channels":
        found, wanted = CHANNEL_NAMES[result.channels], CHANNEL_NAMES[spec.num_channels]
        if first_match is not None:
            return DatasetError(
                f"mixed channel counts: {where} is {found} while the images before it (e.g. "
                f"{source.describe(first_match)}) are {wanted} (data.num_channels={spec.num_channels}): set "
                f"data.convert_channels=True to convert every image to {wanted.split(' ')[0]}, or remove the odd ones")
        return DatasetError(
            f"{where} is {found} but data.num_channels={spec.num_channels}: set data.num_channels="
            f"{result.channels} if your images are all {found.split(' ')[0]}, or data.convert_channels=True to "
            f"convert every image to {wanted.split(' ')[0]}")
    width, height = result.size
    side = min(width, height)
    return DatasetError(
        f"{where} is {width}×{height} pixels: its center square ({side}×{side}) is smaller than data.image_size="
        f"{spec.image_size}, and images are never upsampled silently. Lower data.image_size, remove the small "
        "images, or set data.allow_upsample=True to enlarge them")


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_images(source, spec: Preprocessing, threads: Optional[int] = None):
    """Read and preprocess every image of the source (in a pool of threads, in order).

    Returns (images (N, C, S, S) uint8, positions (N,) of the used images in the source, skipped [(name,
    reason)]). Raises DatasetError at the first image that does not fit the config, or at the first unreadable
    one unless data.skip_corrupt.
    """
    n, size, channels = len(source.names), spec.image_size, spec.num_channels
    images = np.empty((n, channels, size, size), np.uint8)
    positions, skipped, first_match = [], [], None
    threads = threads or max(1, min(MAX_DECODE_THREADS, available_cpus()))
    executor = ThreadPoolExecutor(threads)
    try:
        results = executor.map(lambda i: _read_one(source, i, spec), range(n))
        for i, result in enumerate(Progress(results, total=n, desc="preprocessing images", enabled=n >= 1000)):
            name = source.names[i]
            if result.problem is not None:
                if not spec.skip_corrupt:
                    raise DatasetError(f"cannot read image {source.describe(name)} ({result.problem}): replace or "
                                       "delete it, or set data.skip_corrupt=True to skip unreadable images (they "
                                       "are counted and reported)")
                skipped.append((name, result.problem))
                continue
            if result.pixels is None:
                raise _rejection(source, name, result, spec, first_match)
            first_match = first_match or name
            images[len(positions)] = result.pixels
            positions.append(i)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    if not positions:
        raise DatasetError(f"none of the {n} images under data.root={str(source.root)!r} could be read "
                           f"(e.g. {_examples([s[0] for s in skipped])})")
    return images[:len(positions)], np.asarray(positions, dtype=np.int64), skipped


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------
@dataclass
class Preprocessed:
    """Preprocessed pixels of a source, from the cache or freshly decoded."""

    images: np.ndarray  # (N, C, S, S) uint8
    names: List[str]  # of the N images
    positions: np.ndarray  # (N,) their indices in the source listing
    skipped: List[Tuple[str, str]]  # (name, reason) of unreadable images left out
    kind: str  # folder | zip | array
    key: str  # SHA-256 of the source fingerprint and the preprocessing keys
    path: Path  # the cache entry
    from_cache: bool


def cache_key(source, spec: Preprocessing) -> str:
    return _sha256({"version": CACHE_VERSION, "kind": source.kind, "source": source.fingerprint(),
                    "preprocessing": asdict(spec)})


def default_cache_dir(root) -> Path:
    return Path(root).expanduser().resolve().parent / CACHE_FOLDER


def cache_entry(cache_dir: Path, source, spec: Preprocessing, key: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", source.root.stem) or "images"
    mode = CHANNEL_MODES[spec.num_channels]
    return Path(cache_dir) / f"{stem}_{spec.image_size}px_{mode}_{spec.resize_filter}_{key[:KEY_CHARS]}.npz"


def _write_entry(path: Path, images: np.ndarray, names: List[str], positions: np.ndarray,
                 skipped: List[Tuple[str, str]]) -> None:
    try:  # uncompressed: loads at disk speed; the .sha256 sidecar is checked when it is read
        save_verified_npz(path, compressed=False, images=images, names=np.asarray(names, dtype=str),
                          positions=positions, skipped=np.asarray([s[0] for s in skipped], dtype=str),
                          skipped_reasons=np.asarray([s[1] for s in skipped], dtype=str))
    except OSError as err:
        raise DatasetError(f"cannot write the preprocessed images to {path} ({err}): set data.cache_dir to a "
                           "writable folder") from err


def _read_entry(path: Path):
    entry = load_verified_npz(path, "preprocessed images")
    if entry is None:
        return None
    try:
        return (entry["images"], entry["names"].tolist(), entry["positions"],
                list(zip(entry["skipped"].tolist(), entry["skipped_reasons"].tolist())))
    except KeyError as err:
        log.warning("the cached preprocessed images %s lack %s: preprocessing the images again", path, err)
        return None


def load_images(d) -> Preprocessed:
    """The preprocessed images of data.root (config section `d`), decoded once and cached."""
    spec = Preprocessing.from_config(d)
    source = open_source(d.root)
    key = cache_key(source, spec)
    path = cache_entry(Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir(d.root), source, spec,
                       key)
    if path.is_file() and (entry := _read_entry(path)) is not None:
        images, names, positions, skipped = entry
        return Preprocessed(images, names, positions, skipped, source.kind, key, path, from_cache=True)
    start = time.time()
    images, positions, skipped = decode_images(source, spec)
    names = [source.names[i] for i in positions]
    _write_entry(path, images, names, positions, skipped)
    log.info("preprocessed %d images of %s in %.1f s → %s", len(names), source.root, time.time() - start, path)
    return Preprocessed(images, names, positions, skipped, source.kind, key, path, from_cache=False)


# --------------------------------------------------------------------------------------------------
# Splits and labels
# --------------------------------------------------------------------------------------------------
def has_split_folders(names: Sequence[str]) -> bool:
    """Whether every image lies in a top-level train/ or test/ folder, and both hold some."""
    firsts = [PurePosixPath(n).parts[0] if len(PurePosixPath(n).parts) > 1 else None for n in names]
    return set(firsts) == set(SPLIT_FOLDERS)


def _name_hash(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big")


def split_indices(names: Sequence[str], test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into names, each in the names' order: the train/ and test/ folders when present,
    else the round(N·test_fraction) (at least 1) names of lowest hash under seed are the test split; with
    test_fraction = 0 the test split is the whole training split."""
    n = len(names)
    if has_split_folders(names):
        is_test = np.array([PurePosixPath(name).parts[0] == "test" for name in names])
        return np.flatnonzero(~is_test), np.flatnonzero(is_test)
    if test_fraction == 0:
        return np.arange(n), np.arange(n)
    num_test = max(1, round(n * test_fraction))
    if num_test >= n:
        raise DatasetError(f"only {n} image(s): too few to hold out data.test_fraction={test_fraction} of them for "
                           "testing; add images or set data.test_fraction=0 (test on the training images)")
    order = sorted(range(n), key=lambda i: (_name_hash(names[i], seed), names[i]))
    test = np.sort(np.asarray(order[:num_test], dtype=np.int64))
    return np.setdiff1d(np.arange(n), test), test


def _class_ids(values: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
    """Label strings → (class ids, class names): integers as they are, otherwise numbered in sorted order."""
    if all(re.fullmatch(r"\d+", v) for v in values):
        ids = np.asarray([int(v) for v in values], dtype=np.int64)
        return ids, [str(c) for c in range(int(ids.max()) + 1)]
    classes = sorted(set(values))
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[v] for v in values], dtype=np.int64), classes


def folder_labels(names: Sequence[str], kind: str) -> Tuple[np.ndarray, List[str]]:
    """Class of each image: its first folder below data.root (below train/ or test/ when those exist)."""
    if kind == "array":
        raise DatasetError("data.labels='folders' but data.root is an array, which has no folders: give the "
                           "path of a labels file (.npy of N integers, or .csv lines 'index,label')")
    strip = 1 if has_split_folders(names) else 0
    parts = [PurePosixPath(n).parts[strip:] for n in names]
    loose = [n for n, p in zip(names, parts) if len(p) < 2]
    if loose:
        raise DatasetError(f"data.labels='folders' but {len(loose)} image(s) are not in a class sub-folder "
                           f"(e.g. {_examples(loose)}): put every image in a folder named after its class, or set "
                           "data.labels='none'")
    return _class_ids([p[0] for p in parts])


def _read_label_table(path: Path) -> dict:
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2:
            raise DatasetError(f"{path} line {number}: expected 'name,label', got {line!r}")
        if number == 1 and fields[0].lower() in ("name", "path", "file", "index"):
            continue  # header
        table[PurePosixPath(fields[0].replace("\\", "/")).as_posix()] = fields[1]
    return table


def file_labels(path_text: str, names: Sequence[str], positions: np.ndarray,
                num_source: int) -> Tuple[np.ndarray, List[str]]:
    """Labels from a .npy (one integer per source image, in source order) or a .csv/.txt of 'name,label'."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise DatasetError(f"data.labels={path_text!r} is no file: use 'none', 'folders', or the path of a labels "
                           "file (.csv/.txt lines 'name,label', or a .npy of integers)")
    if path.suffix.lower() == ".npy":
        values = np.load(path)
        if values.ndim != 1 or len(values) != num_source or not np.issubdtype(values.dtype, np.integer):
            raise DatasetError(f"{path} holds {values.dtype} of shape {values.shape}; expected {num_source} integer "
                               "labels, one per source image in source order")
        if values.min() < 0:
            raise DatasetError(f"{path} holds negative labels; class ids are integers ≥ 0")
        return _class_ids([str(int(v)) for v in values[positions]])
    table = _read_label_table(path)
    missing = [n for n in names if n not in table]
    if missing:
        raise DatasetError(f"data.labels file {path} has no label for {len(missing)} of {len(names)} images "
                           f"(e.g. {_examples(missing)}); every image needs a line 'name,label'")
    return _class_ids([table[n] for n in names])


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------
class FolderDataset(ImageDataset):
    """An ImageDataset of your own images (uint8, 256 levels), with where they came from.

    Beyond ImageDataset: `train_names` / `test_names`, `class_names` (None without labels), `skipped`
    [(name, reason)] of unreadable images left out, `cache_path`, and `reference_name` / `stats_dir` for
    FID reference statistics (named by a hash of the images and the split, so two folders never share them).
    """

    def __init__(self, images: Preprocessed, train_idx: np.ndarray, test_idx: np.ndarray,
                 labels: Optional[np.ndarray], class_names: Optional[List[str]], *, source: str, stats_dir: Path,
                 split_key: str, **loading):
        pixels = torch.from_numpy(np.ascontiguousarray(images.images))
        train = pixels[torch.from_numpy(train_idx)]
        test = train if np.array_equal(train_idx, test_idx) else pixels[torch.from_numpy(test_idx)]
        train_y = test_y = None
        if labels is not None:
            train_y, test_y = torch.from_numpy(labels[train_idx]), torch.from_numpy(labels[test_idx])
        super().__init__(train, test, NUM_LEVELS, train_labels=train_y, test_labels=test_y, **loading)
        self.source, self.cache_path, self.skipped = source, images.path, images.skipped
        self.train_names = [images.names[i] for i in train_idx]
        self.test_names = [images.names[i] for i in test_idx]
        self.class_names = class_names
        self.reference_name = f"folder-{_sha256([images.key, split_key])[:KEY_CHARS]}"
        self.stats_dir = stats_dir


def load_folder_dataset(d, **loading) -> FolderDataset:
    """data.dataset='folder': the images of data.root (config section `d`), split and labelled as configured;
    `loading` are ImageDataset's keyword arguments (batch size, seed, augmentation, sharding, workers)."""
    start = time.time()
    images = load_images(d)
    if images.skipped:
        log.warning("skipped %d unreadable image(s) of %s (data.skip_corrupt=True): %s", len(images.skipped),
                    d.root, "; ".join(f"{name} ({why})" for name, why in images.skipped[:EXAMPLES_SHOWN]))
    train_idx, test_idx = split_indices(images.names, d.test_fraction, d.split_seed)
    labels = class_names = None
    if d.labels == "folders":
        labels, class_names = folder_labels(images.names, images.kind)
    elif d.labels != "none":
        num_source = len(images.positions) + len(images.skipped)
        labels, class_names = file_labels(d.labels, images.names, images.positions, num_source)
    cache_dir = images.path.parent
    dataset = FolderDataset(images, train_idx, test_idx, labels, class_names, source=str(d.root),
                            stats_dir=cache_dir / "fid_stats", split_key=f"{d.test_fraction}/{d.split_seed}",
                            **loading)
    log.info("folder dataset %s: %d images (%d train, %d test%s), %s, %d skipped, %s %s in %.1f s", d.root,
             len(images.names), len(train_idx), len(test_idx), ", test = train" if d.test_fraction == 0 else "",
             "×".join(map(str, images.images.shape[1:])),
             len(images.skipped), "cache hit" if images.from_cache else "cached to", images.path, time.time() - start)
    return dataset


def check_config(d) -> None:
    """The data.* keys of data.dataset='folder' (config section `d`). Raises ConfigError naming the key."""
    choice("data.resize_filter", d.resize_filter, RESIZE_FILTERS)
    choice("data.num_channels", d.num_channels, CHANNEL_MODES)
    positive("data.image_size", d.image_size)
    if not 0.0 <= d.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction must lie in [0, 1) (0: the test split is the training set), "
                          f"got {d.test_fraction}")
    if not d.labels.strip():
        raise ConfigError("data.labels is empty: use 'none', 'folders' or the path of a labels file")
