"""The packed feature store: every region of a feature folder in one memory-mapped array.

For each folder `FEATURE_PATH/<folder>/` of per-image `.npz` files, a folder
`FEATURE_PATH/<folder>.packed/` (or one under STORE_PATH) holds:
- `features.npy`: (total regions, D) float32, the images' `x.T` one after another (memory-mapped, or
  read into memory with PRELOAD True);
- `index.npz`: `image_ids` (sorted), `offsets` (image i's regions are rows offsets[i]:offsets[i+1]),
  `boxes` (total regions, 4; zeros for files without `bbox`), `sizes` (images, 2) each image's
  `image_w`, `image_h` (or `width`, `height`: openvqa's GQA files; zeros when its file has none);
- `meta.json`: the plan (format, feature size), the state of the source folder, image and region counts.

Built when missing or stale (`data/build.py` says when, and how it is written), by `accuvqa prepare` or
by the first command that needs it; an interrupted packing resumes where it stopped. Commands read
only this store, never the `.npz` files; its features equal theirs bit for bit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from accuvqa.data.build import Partial, build_progress, ensure_store, folder_state, store_home, why_stale
from accuvqa.data.features import count_regions, index_features, read_regions
from accuvqa.data.layout import Layout
from accuvqa.errors import DataError
from accuvqa.files import write_json_atomic

FORMAT = 2
_SAVE_EVERY = 2000  # images between progress marks of an interrupted packing
WHAT = "packed feature store"
EXTRACTOR_FILE = "extractor.json"  # what `accuvqa extract` writes beside the features it extracts
_FEATURE_FILE = re.compile(r"COCO_(\w+?)_(\d+)\.jpg\.npz")


def store_dir(feature_path: str | Path, folder: str, store_path: str = "") -> Path:
    """`FEATURE_PATH/<folder>.packed` (under STORE_PATH when given)."""
    return store_home(store_path, feature_path) / f"{folder}.packed"


def pack_folder(feature_path: str | Path, folder: str, feat_size: int,
                progress: Callable[[Sequence, str], Iterable] = build_progress(False), store_path: str = "",
                layout: Layout | None = None) -> Path:
    """The current packed store of one feature folder, packed first when missing or stale. `layout` says how
    the folder's files map to image ids (default: VQA v2's `COCO_<folder>_<id>.jpg.npz`)."""
    source = Path(feature_path) / folder
    index = (lambda: layout.index_features(folder)) if layout is not None else (
        lambda: index_features(feature_path, [folder]))
    recursive = bool(getattr(layout, "recursive", False))
    # a layout may join more to each image's regions (GQA's grid features): its own reader, plan and sources
    reader = getattr(layout, "packing", lambda folder: None)(folder) or Packing()
    if not source.is_dir() and not (store_dir(feature_path, folder, store_path) / "meta.json").is_file():
        index()  # the DataError naming the folder (and FEATURE_PATH), nothing written

    def sources() -> dict[str, Any]:
        return {str(source.resolve()): folder_state(source, recursive=recursive),
                **{str(extra.resolve()): folder_state(extra) for extra in reader.sources}}

    return ensure_store(store_dir(feature_path, folder, store_path),
                        {"format": FORMAT, "feat_size": feat_size, **reader.plan}, sources,
                        lambda partial: _pack(partial, feature_path, folder, feat_size, progress, index, reader), WHAT)


class Packing:
    """How `pack_folder` reads one image's regions: its feature file as it is (a layout may return another
    Packing from `packing(folder)`, joining more regions, with the plan keys and source folders that adds)."""

    plan: dict[str, Any] = {}
    sources: tuple[Path, ...] = ()

    def count(self, path: Path, feat_size: int) -> int:
        """Regions of one image, from headers."""
        return count_regions(path, feat_size)

    def read(self, path: Path, feat_size: int) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int] | None]:
        """Features (N, D), boxes (N, 4) or None, (width, height) or None of one image."""
        return read_regions(path, feat_size)


def _pack(partial: Partial, feature_path: str | Path, folder: str, feat_size: int,
          progress: Callable[[Sequence, str], Iterable], index: Callable[[], dict[int, Path]], reader: Packing) -> Path:
    """Write the store into `partial` (see the module docstring), resuming an interrupted packing."""
    paths = index()
    image_ids = np.array(sorted(paths), dtype=np.int64)
    progress_file = partial.path / "progress.json"
    done = 0
    if partial.resumed:
        try:
            done = int(json.loads(progress_file.read_text())["done"])
        except (OSError, ValueError, KeyError, TypeError):
            done = 0
    if done == 0:  # a fresh start: count regions from the headers, lay out the array
        counts = np.zeros(len(image_ids), dtype=np.int64)
        for i, image_id in enumerate(progress(image_ids.tolist(), f"count {folder}")):
            counts[i] = reader.count(paths[image_id], feat_size)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        np.save(partial.path / "offsets.npy", offsets)
        np.lib.format.open_memmap(partial.path / "features.npy", mode="w+", dtype=np.float32,
                                  shape=(int(offsets[-1]), feat_size)).flush()
        np.lib.format.open_memmap(partial.path / "boxes.npy", mode="w+", dtype=np.float32,
                                  shape=(int(offsets[-1]), 4)).flush()
    offsets = np.load(partial.path / "offsets.npy")
    features = np.load(partial.path / "features.npy", mmap_mode="r+")
    boxes = np.load(partial.path / "boxes.npy", mmap_mode="r+")
    sizes_file = partial.path / "sizes.npy"
    sizes = np.load(sizes_file) if done and sizes_file.is_file() else np.zeros((len(image_ids), 2), dtype=np.int64)
    for i in progress(range(done, len(image_ids)), f"pack {folder}"):
        path = paths[int(image_ids[i])]
        x, bbox, size = reader.read(path, feat_size)  # (N, D) every region, (N, 4) or None, (w, h) or None
        if x.shape[0] != offsets[i + 1] - offsets[i]:
            raise DataError(f"{path} changed while it was being packed; run the command again")
        features[offsets[i]: offsets[i + 1]] = x
        if bbox is not None:
            boxes[offsets[i]: offsets[i + 1]] = bbox
        if size is not None:
            sizes[i] = size
        if (i + 1) % _SAVE_EVERY == 0:
            features.flush(), boxes.flush()
            np.save(sizes_file, sizes)
            write_json_atomic(progress_file, {"done": i + 1})
    features.flush(), boxes.flush()
    del features, boxes
    np.savez(partial.path / "index.npz", image_ids=image_ids, offsets=offsets,
             boxes=np.load(partial.path / "boxes.npy"), sizes=sizes)
    for name in ("boxes.npy", "offsets.npy", "sizes.npy", "progress.json"):
        (partial.path / name).unlink(missing_ok=True)
    extractor = _extractor(Path(feature_path) / folder)
    return partial.finish(images=len(image_ids), regions=int(offsets[-1]), feature_path=str(feature_path),
                          **({"extractor": extractor} if extractor else {}))


def _extractor(source: Path) -> dict | None:
    """The extractor `accuvqa extract` recorded for a folder's features (its extractor.json), None without one."""
    try:
        spec = json.loads((source / EXTRACTOR_FILE).read_text())
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


class PackedFeatures:
    """One folder's packed store, memory-mapped (or in memory with `preload`); DataError when it holds
    another feature size, or is truncated or unreadable."""

    def __init__(self, path: Path, feat_size: int, preload: bool = False) -> None:
        self.path = path
        try:
            meta = json.loads((path / "meta.json").read_text())
            with np.load(path / "index.npz") as index:
                self.image_ids, self.offsets, self.sizes = index["image_ids"], index["offsets"], index["sizes"]
            self.features = np.load(path / "features.npy", mmap_mode=None if preload else "r")
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"packed feature store {path} cannot be read ({e}); delete it: the next command "
                            f"packs it again") from e
        plan = meta.get("plan", {}) if isinstance(meta, dict) else {}
        self.extractor = meta.get("extractor") if isinstance(meta, dict) else None  # the extract spec, if any
        if plan.get("format") != FORMAT or plan.get("feat_size") != feat_size:
            raise DataError(f"packed feature store {path} holds features of size {plan.get('feat_size')} "
                            f"(format {plan.get('format')}), not IMG_FEAT_SIZE {feat_size}; delete it: the next "
                            f"command packs it again")
        if self.features.shape != (int(self.offsets[-1]), feat_size):
            raise DataError(f"packed feature store {path}/features.npy is truncated or damaged: shape "
                            f"{self.features.shape}, expected ({int(self.offsets[-1])}, {feat_size}); delete it: the next "
                            f"command packs it again")
        self.row = {int(iid): i for i, iid in enumerate(self.image_ids)}
        self.boxes: np.ndarray | None = None  # loaded by the first read_boxes

    def count(self, image_id: int) -> int:
        """Number of regions of one image."""
        i = self.row[image_id]
        return int(self.offsets[i + 1] - self.offsets[i])

    def read_boxes(self, image_id: int, pad_size: int, missing_ok: bool = False) -> np.ndarray:
        """(N, 4) float32 boxes of one image, cut to `pad_size` (as `read_boxes`); DataError when its
        `.npz` had none (the store keeps zeros then), unless `missing_ok` (zeros returned)."""
        if self.boxes is None:
            with np.load(self.path / "index.npz") as index:
                self.boxes = index["boxes"]  # (total regions, 4), read when a model first asks
        i = self.row[image_id]
        start = int(self.offsets[i])
        boxes = self.boxes[start: int(self.offsets[i + 1])]
        if len(boxes) and not boxes.any() and not missing_ok:
            raise DataError(f"packed feature store {self.path} holds no boxes for image {image_id}: its .npz has "
                            f"no 'bbox' (N, 4), which the model reads (MODEL_USE)")
        return boxes[:pad_size]

    def image_size(self, image_id: int) -> tuple[int, int] | None:
        """(width, height) in pixels of one image; None when its file did not say."""
        width, height = self.sizes[self.row[image_id]].tolist()
        return (width, height) if width and height else None

    def read(self, image_id: int, pad_size: int) -> np.ndarray:
        """(N, D) float32 regions of one image, cut to `pad_size` (as `read_features`)."""
        i = self.row[image_id]
        start = int(self.offsets[i])
        return np.asarray(self.features[start: min(int(self.offsets[i + 1]), start + pad_size)])


def dataset_image(feature_path: str | Path, path: str | Path, feat_size: int, store_path: str = ""
                  ) -> tuple[PackedFeatures, int] | None:
    """(its folder's store, image id) when `path` names a dataset image's feature file
    (`<folder>/COCO_<folder>_<id>.jpg.npz`, present or moved away) held by a built store; else None."""
    match = _FEATURE_FILE.fullmatch(Path(path).name)
    if match is None:
        return None
    folder, image_id = match.group(1), int(match.group(2))
    source = Path(feature_path) / folder
    if Path(path).resolve().parent != source.resolve():  # a file of that name elsewhere: not the dataset's image
        return None
    store = store_dir(feature_path, folder, store_path)
    if not (store / "meta.json").is_file():
        return None
    if Path(path).is_file() and why_stale(store, {"format": FORMAT, "feat_size": feat_size},
                                          {str(source.resolve()): folder_state(source)}) is not None:
        return None  # the folder changed since it was packed: the file itself is read
    packed = PackedFeatures(store, feat_size)
    return (packed, image_id) if image_id in packed.row else None


def open_features(feature_path: str | Path, folders: Sequence[str], feat_size: int, preload: bool = False,
                  store_path: str = "", progress: Callable[[Sequence, str], Iterable] = build_progress(False),
                  layout: Layout | None = None) -> dict[int, PackedFeatures]:
    """image id -> its folder's packed store, over `folders` (each packed first when missing or stale)."""
    stores: dict[int, PackedFeatures] = {}
    for folder in folders:
        store = PackedFeatures(pack_folder(feature_path, folder, feat_size, progress, store_path, layout),
                               feat_size, preload)
        stores.update(dict.fromkeys(store.row, store))
    return stores
