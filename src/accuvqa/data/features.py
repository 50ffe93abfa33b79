"""Region features: one `.npz` per image, `x` stored (D, N) for N regions as mcan-vqa reads it, or (N, D) as
bottom-up-attention.pytorch writes it (both read; its extra keys, such as `info`, are ignored).

FEATURE_PATH holds `<folder>/COCO_<folder>_<12-digit image id>.jpg.npz`.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from accuvqa.data.records import LAYOUT_HINT
from accuvqa.errors import DataError


def feature_file(feature_path: str | Path, folder: str, image_id: int) -> Path:
    """Path of one image's region features."""
    return Path(feature_path) / folder / f"COCO_{folder}_{image_id:012d}.jpg.npz"


def index_features(feature_path: str | Path, folders: Sequence[str]) -> dict[int, Path]:
    """image id -> feature file, over the given feature folders."""
    index: dict[int, Path] = {}
    for folder in folders:
        root = Path(feature_path) / folder
        if not root.is_dir():
            why = (f" (FEATURE_PATH {feature_path} does not exist)" if not Path(feature_path).is_dir() else "")
            raise DataError(f"missing feature folder {root}{why}; {LAYOUT_HINT}")
        prefix = f"COCO_{folder}_"
        with os.scandir(root) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(prefix) and name.endswith(".jpg.npz"):
                    index[int(name[len(prefix):-len(".jpg.npz")])] = Path(entry.path)
    return index


def _unreadable(path: Path, e: BaseException) -> DataError:
    """The one-line error for a feature file that cannot be read, with the likely cause."""
    if isinstance(e, KeyError):
        why = "it holds no array 'x' (bottom-up attention features store x as (IMG_FEAT_SIZE, N))"
    elif isinstance(e, zipfile.BadZipFile) and "CRC" in str(e):
        why = f"it is corrupt ({e}); re-extract it"
    elif isinstance(e, zipfile.BadZipFile):
        why = "it is truncated or not an .npz file (an interrupted copy or extraction?); re-extract it"
    else:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        why = f"it is corrupt or truncated ({type(e).__name__}{': ' + detail if detail else ''}); re-extract it"
    return DataError(f"cannot read region features {path}: {why}")


def regions_first(path: Path, shape: tuple, feat_size: int) -> bool:
    """Whether `x` of this shape is stored (N, D) (bottom-up-attention.pytorch) rather than (D, N) (mcan-vqa's
    layout); DataError when it is neither for IMG_FEAT_SIZE `feat_size`, or when N == D makes it ambiguous."""
    if len(shape) != 2:
        raise DataError(f"{path}: 'x' has shape {tuple(shape)}, expected 2 dimensions: (IMG_FEAT_SIZE, N) as "
                        f"mcan-vqa stores it, or (N, IMG_FEAT_SIZE) as bottom-up-attention.pytorch does")
    rows, cols = shape
    if rows == cols == feat_size:
        raise DataError(f"{path}: 'x' has shape {tuple(shape)}: with as many regions as features (IMG_FEAT_SIZE "
                        f"{feat_size}) it cannot be told whether it is (D, N) or (N, D); extract this image with "
                        f"another number of regions")
    if feat_size not in shape:
        size, count = max(shape), min(shape)
        raise DataError(f"{path}: 'x' has shape {tuple(shape)}, and neither side is IMG_FEAT_SIZE {feat_size}; if "
                        f"these are {size}-d features of {count} regions, set IMG_FEAT_SIZE {size}")
    return cols == feat_size


def region_count(path: Path, shape: tuple, feat_size: int) -> int:
    """Number of regions of a file whose `x` has this shape (either orientation; see `regions_first`)."""
    return shape[0] if regions_first(path, shape, feat_size) else shape[1]


_READ_ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError)


def read_features(path: Path, feat_size: int, pad_size: int) -> np.ndarray:
    """One image's region features as (N, D) float32, cut to `pad_size` regions (not padded)."""
    try:
        with np.load(path) as npz:
            x = npz["x"]
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e
    x = x if regions_first(path, x.shape, feat_size) else x.T  # (N, D)
    return np.ascontiguousarray(x[:pad_size], dtype=np.float32)


def read_boxes(path: Path, pad_size: int) -> np.ndarray:
    """One image's region boxes `bbox` (x1, y1, x2, y2 in pixels) as (N, 4) float32, cut to `pad_size`."""
    try:
        with np.load(path) as npz:
            if "bbox" not in npz.files:
                raise DataError(f"{path} holds no region boxes 'bbox' (N, 4), which the model reads "
                                f"(MODEL_USE); use features written with their boxes")
            bbox = npz["bbox"]
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e
    if bbox.ndim != 2 or bbox.shape[1] != 4:
        raise DataError(f"{path}: 'bbox' has shape {tuple(bbox.shape)}, expected (N, 4): x1, y1, x2, y2 per region")
    return np.ascontiguousarray(bbox[:pad_size], dtype=np.float32)


def feature_shape(path: Path) -> tuple[int, ...]:
    """The shape of one file's `x`, read from the .npy header inside the zip: no feature is read."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("x.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(f)
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e
    return tuple(shape)


def region_counts(paths: Sequence[Path], feat_size: int) -> np.ndarray:
    """Number of regions of each feature file, from headers only; DataError for the first file that
    cannot be read or whose feature size is not `feat_size` (so bad files are named at start)."""
    counts = np.zeros(len(paths), dtype=np.int64)
    for i, path in enumerate(paths):
        counts[i] = region_count(path, feature_shape(path), feat_size)
    return counts


def count_regions(path: Path, feat_size: int) -> int:
    """Number of regions of one feature file, from its header (no feature is read)."""
    return region_count(path, feature_shape(path), feat_size)


def read_regions(path: Path, feat_size: int) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int] | None]:
    """Every region of one feature file as the packed store keeps it: features (N, D), boxes (N, 4) or None, and
    the image's (width, height) (`image_w`/`image_h`, or openvqa's GQA `width`/`height`) or None."""
    x = read_features(path, feat_size, 2**62)
    try:
        with np.load(path) as npz:
            boxes = np.asarray(npz["bbox"], dtype=np.float32) if "bbox" in npz.files else None
            keys = next((k for k in (("image_w", "image_h"), ("width", "height")) if set(k) <= set(npz.files)), None)
            size = (int(npz[keys[0]]), int(npz[keys[1]])) if keys else None
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e
    return x, (boxes if boxes is not None and boxes.shape == (x.shape[0], 4) else None), size
