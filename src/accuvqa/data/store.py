"""The packed feature store: every region of a feature folder in one memory-mapped array.

`accuvqa prepare` (DATASET vqa) writes, beside each folder `FEATURE_PATH/<folder>/` of per-image
`.npz` files, a folder `FEATURE_PATH/<folder>.packed/` holding:
- `features.npy`: (total regions, D) float32, the images' `x.T` one after another (memory-mapped);
- `index.npz`: `image_ids` (sorted), `offsets` (image i's regions are rows offsets[i]:offsets[i+1]),
  `boxes` (total regions, 4) when the files have `bbox`;
- `meta.json`: feature size, counts, and a fingerprint of the source folder (file names, sizes,
  modification times) that tells a stale store from a current one.

It is written into `<folder>.packed.partial/` and renamed into place when complete; an interrupted
packing resumes where it stopped. Training, val, test and predict read it when it is there and
current, the `.npz` files otherwise. Its features equal the `.npz` ones bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from accuvqa.data.features import feature_shape, index_features, read_features
from accuvqa.errors import DataError
from accuvqa.files import write_json_atomic

FORMAT = 1
_SAVE_EVERY = 2000  # images between progress marks of an interrupted packing


def store_dir(feature_path: str | Path, folder: str) -> Path:
    """`FEATURE_PATH/<folder>.packed`."""
    return Path(feature_path) / f"{folder}.packed"


def folder_fingerprint(feature_path: str | Path, folder: str) -> tuple[str, int]:
    """(hash of the folder's .npz names, sizes and modification times, number of files)."""
    digest = hashlib.sha256()
    entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                     for e in os.scandir(Path(feature_path) / folder) if e.name.endswith(".npz"))
    for name, size, mtime in entries:
        digest.update(f"{name}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:32], len(entries)


def pack_folder(feature_path: str | Path, folder: str, feat_size: int,
                progress: Callable[[Iterable, str], Iterable] = lambda items, desc: items) -> Path:
    """Pack one feature folder (see the module docstring); return the store's folder.

    A current store is left as it is; a stale one is replaced; an interrupted packing resumes.
    """
    final = store_dir(feature_path, folder)
    fingerprint, n_files = folder_fingerprint(feature_path, folder)
    if final.is_dir():
        try:
            PackedFeatures(final, feat_size, expect=(fingerprint, n_files))
            return final  # current
        except DataError:
            pass  # stale or damaged: pack again
    paths = index_features(feature_path, [folder])
    image_ids = np.array(sorted(paths), dtype=np.int64)
    partial = final.with_name(final.name + ".partial")
    plan = {"format": FORMAT, "fingerprint": fingerprint, "files": n_files, "feat_size": feat_size}
    progress_file = partial / "progress.json"
    done = 0
    try:
        state = json.loads(progress_file.read_text())
        if state["plan"] == plan:
            done = int(state["done"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if done == 0:  # a fresh start: count regions from the headers, lay out the array
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        counts = np.zeros(len(image_ids), dtype=np.int64)
        for i, image_id in enumerate(progress(image_ids.tolist(), f"count {folder}")):
            shape = feature_shape(paths[image_id])
            if len(shape) != 2 or shape[0] != feat_size:
                read_features(paths[image_id], feat_size, 1)  # raises the DataError naming the file
            counts[i] = shape[1]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        np.save(partial / "offsets.npy", offsets)
        np.lib.format.open_memmap(partial / "features.npy", mode="w+", dtype=np.float32,
                                  shape=(int(offsets[-1]), feat_size)).flush()
        np.lib.format.open_memmap(partial / "boxes.npy", mode="w+", dtype=np.float32,
                                  shape=(int(offsets[-1]), 4)).flush()
    offsets = np.load(partial / "offsets.npy")
    features = np.load(partial / "features.npy", mmap_mode="r+")
    boxes = np.load(partial / "boxes.npy", mmap_mode="r+")
    todo = range(done, len(image_ids))
    for i in progress(todo, f"pack {folder}"):
        path = paths[int(image_ids[i])]
        x = read_features(path, feat_size, 2**62)  # (N, D), every region
        if x.shape[0] != offsets[i + 1] - offsets[i]:
            raise DataError(f"{path} changed while it was being packed; run accuvqa prepare again")
        features[offsets[i]: offsets[i + 1]] = x
        with np.load(path) as npz:
            if "bbox" in npz.files and npz["bbox"].shape == (x.shape[0], 4):
                boxes[offsets[i]: offsets[i + 1]] = npz["bbox"]
        if (i + 1) % _SAVE_EVERY == 0:
            features.flush(), boxes.flush()
            write_json_atomic(progress_file, {"plan": plan, "done": i + 1})
    features.flush(), boxes.flush()
    del features, boxes
    np.savez(partial / "index.npz", image_ids=image_ids, offsets=offsets, boxes=np.load(partial / "boxes.npy"))
    (partial / "boxes.npy").unlink()
    (partial / "offsets.npy").unlink()
    progress_file.unlink(missing_ok=True)
    write_json_atomic(partial / "meta.json", {**plan, "images": len(image_ids), "regions": int(offsets[-1])})
    for name in ("features.npy", "index.npz"):
        with open(partial / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


class PackedFeatures:
    """One folder's packed store, memory-mapped; DataError when it is stale, truncated or unreadable."""

    def __init__(self, path: Path, feat_size: int, expect: tuple[str, int] | None = None) -> None:
        self.path = path
        try:
            meta = json.loads((path / "meta.json").read_text())
            with np.load(path / "index.npz") as index:
                self.image_ids, self.offsets = index["image_ids"], index["offsets"]
            self.features = np.load(path / "features.npy", mmap_mode="r")
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"packed feature store {path} cannot be read ({e}); delete it or run accuvqa prepare "
                            f"again") from e
        if meta.get("format") != FORMAT or meta.get("feat_size") != feat_size:
            raise DataError(f"packed feature store {path} holds features of size {meta.get('feat_size')} "
                            f"(format {meta.get('format')}), not IMG_FEAT_SIZE {feat_size}; run accuvqa prepare again")
        if self.features.shape != (int(self.offsets[-1]), feat_size):
            raise DataError(f"packed feature store {path}/features.npy is truncated or damaged: shape "
                            f"{self.features.shape}, expected ({int(self.offsets[-1])}, {feat_size}); run accuvqa "
                            f"prepare again")
        if expect is not None and (meta.get("fingerprint"), meta.get("files")) != expect:
            raise DataError(f"packed feature store {path} is stale: its folder changed since it was packed "
                            f"({meta.get('files')} files then, {expect[1]} now, or files rewritten); run accuvqa "
                            f"prepare again")
        self.row = {int(iid): i for i, iid in enumerate(self.image_ids)}
        self.boxes: np.ndarray | None = None  # loaded by the first read_boxes

    def count(self, image_id: int) -> int:
        """Number of regions of one image."""
        i = self.row[image_id]
        return int(self.offsets[i + 1] - self.offsets[i])

    def read_boxes(self, image_id: int, pad_size: int) -> np.ndarray:
        """(N, 4) float32 boxes of one image, cut to `pad_size` (as `read_boxes`); DataError when its
        `.npz` had none (the store keeps zeros then)."""
        if self.boxes is None:
            with np.load(self.path / "index.npz") as index:
                self.boxes = index["boxes"]  # (total regions, 4), read when a model first asks
        i = self.row[image_id]
        start = int(self.offsets[i])
        boxes = self.boxes[start: int(self.offsets[i + 1])]
        if len(boxes) and not boxes.any():
            raise DataError(f"packed feature store {self.path} holds no boxes for image {image_id}: its .npz has "
                            f"no 'bbox' (N, 4), which the model reads (MODEL_USE)")
        return boxes[:pad_size]

    def read(self, image_id: int, pad_size: int) -> np.ndarray:
        """(N, D) float32 regions of one image, cut to `pad_size` (as `read_features`)."""
        i = self.row[image_id]
        start = int(self.offsets[i])
        return np.asarray(self.features[start: min(int(self.offsets[i + 1]), start + pad_size)])


def open_stores(feature_path: str | Path, folders: Sequence[str], feat_size: int) -> dict[int, PackedFeatures] | None:
    """image id -> its folder's store, when every folder has a current packed store; else None."""
    stores: dict[int, PackedFeatures] = {}
    for folder in folders:
        path = store_dir(feature_path, folder)
        if not path.is_dir():
            return None
        store = PackedFeatures(path, feat_size, expect=folder_fingerprint(feature_path, folder))
        stores.update(dict.fromkeys(store.row, store))
    return stores
