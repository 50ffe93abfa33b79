"""Region features: one `.npz` per image, `x` stored (D, N) for N regions, as bottom-up attention writes it.

FEATURE_PATH holds `<folder>/COCO_<folder>_<12-digit image id>.jpg.npz`.
"""

from __future__ import annotations

import os
import zipfile
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
            raise DataError(f"missing feature folder {root}; {LAYOUT_HINT}")
        prefix = f"COCO_{folder}_"
        with os.scandir(root) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(prefix) and name.endswith(".jpg.npz"):
                    index[int(name[len(prefix):-len(".jpg.npz")])] = Path(entry.path)
    return index


def read_features(path: Path, feat_size: int, pad_size: int) -> np.ndarray:
    """One image's region features as (N, D) float32, cut to `pad_size` regions (not padded)."""
    try:
        with np.load(path) as npz:
            x = npz["x"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read region features {path}: {e or type(e).__name__}") from e
    if x.ndim != 2 or x.shape[0] != feat_size:
        raise DataError(
            f"{path}: 'x' has shape {x.shape}, expected ({feat_size}, N) with IMG_FEAT_SIZE {feat_size}"
        )
    return np.ascontiguousarray(x.T[:pad_size], dtype=np.float32)
