"""`accuvqa extract`: images -> grid features, one `.npz` per image in the layout the rest of accuvqa reads.

Each image is decoded (EXIF orientation applied, any PIL mode made RGB), resized as EXTRACT_RESIZE says
(bilinear with antialiasing, as torchvision's Resize does on PIL images), normalised with ImageNet's mean and
std, and run through the backbone (accuvqa.backbone, torchvision's ResNets and weights) up to BACKBONE_LAYER.
Every cell of that grid is a region: `x` (D, N) float32 with N cells in row-major order, `bbox` (N, 4) the
cells in the original image's pixels (x1, y1, x2, y2), `image_w`, `image_h`, `num_bbox`.

An output folder holds the features of one extractor: `extractor.json` records its spec (backbone, layer,
resize, weights and their sha256), and a run with another spec stops with an error instead of mixing them.
Runs resume: an image whose `.npz` exists is skipped; files are written atomically.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from accuvqa.backbone import BACKBONES, LAYERS, ResNet, build_backbone
from accuvqa.config import Config
from accuvqa.errors import ConfigError, DataError
from accuvqa.files import atomic_write, write_json_atomic
from accuvqa.runlog import print_table, progress
from accuvqa.runtime import setup_runtime

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPEC_FILE = "extractor.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's ImageNet weights for each backbone: (its weights enum, {version: url}, the DEFAULT version),
# copied from torchvision/models/resnet.py (0.29); other names are looked up in torchvision where it imports
TORCHVISION_WEIGHTS: dict[str, tuple[str, dict[str, str], str]] = {
    "resnet50": ("ResNet50_Weights", {
        "IMAGENET1K_V1": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "IMAGENET1K_V2": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"}, "IMAGENET1K_V2"),
    "resnet101": ("ResNet101_Weights", {
        "IMAGENET1K_V1": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
        "IMAGENET1K_V2": "https://download.pytorch.org/models/resnet101-cd907fc2.pth"}, "IMAGENET1K_V2"),
    "resnet152": ("ResNet152_Weights", {
        "IMAGENET1K_V1": "https://download.pytorch.org/models/resnet152-394f9c45.pth",
        "IMAGENET1K_V2": "https://download.pytorch.org/models/resnet152-f82ba261.pth"}, "IMAGENET1K_V2"),
    "resnext50_32x4d": ("ResNeXt50_32X4D_Weights", {
        "IMAGENET1K_V1": "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth",
        "IMAGENET1K_V2": "https://download.pytorch.org/models/resnext50_32x4d-1a0047aa.pth"}, "IMAGENET1K_V2"),
    "resnext101_32x8d": ("ResNeXt101_32X8D_Weights", {
        "IMAGENET1K_V1": "https://download.pytorch.org/models/resnext101_32x8d-8ba56ff5.pth",
        "IMAGENET1K_V2": "https://download.pytorch.org/models/resnext101_32x8d-110c445d.pth"}, "IMAGENET1K_V2"),
    "resnext101_64x4d": ("ResNeXt101_64X4D_Weights", {
        "IMAGENET1K_V1": "https://download.pytorch.org/models/resnext101_64x4d-173b62eb.pth"}, "IMAGENET1K_V1"),
    "wide_resnet50_2": ("Wide_ResNet50_2_Weights", {
        "IMAGENET1K_V1": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
        "IMAGENET1K_V2": "https://download.pytorch.org/models/wide_resnet50_2-9ba9bcbe.pth"}, "IMAGENET1K_V2"),
    "wide_resnet101_2": ("Wide_ResNet101_2_Weights", {
        "IMAGENET1K_V1": "https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth",
        "IMAGENET1K_V2": "https://download.pytorch.org/models/wide_resnet101_2-d733dc28.pth"}, "IMAGENET1K_V2"),
}
_WEIGHTS_NAME = re.compile(r"^(?:(\w+_Weights)\.)?(IMAGENET1K_\w+|DEFAULT)$")


# ----------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class ImageSource:
    """One image to extract: its relative name (the output is <out_dir>/<name>.npz) and how to read its bytes."""

    name: str
    read: Callable[[], bytes] = field(compare=False)


def sources_from_paths(paths_or_folders: Sequence[Path]) -> list[ImageSource]:
    """Images named on the command line: a folder's images (recursively, named relative to it), a file (named by
    its file name), or a `.txt` list of paths, one a line (relative ones from the list's folder, named so)."""
    sources: list[ImageSource] = []
    for path in map(Path, paths_or_folders):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            sources += [ImageSource(p.relative_to(path).as_posix(), partial(p.read_bytes)) for p in found]
        elif path.suffix.lower() == ".txt" and path.is_file():
            sources += _listed(path)
        elif path.is_file():
            sources.append(ImageSource(path.name, partial(path.read_bytes)))
        else:
            raise DataError(f"image {path} does not exist: give image files, folders of images, or .txt lists "
                            f"of image paths")
    _check_names(sources)
    return sources


def _listed(list_file: Path) -> list[ImageSource]:
    """The images a .txt list names, one path a line ('#' comments and blank lines skipped); a missing one is
    reported as a bad image when it is read, not here."""
    sources = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        listed = Path(line)
        path = listed if listed.is_absolute() else list_file.parent / listed
        name = listed.name if listed.is_absolute() or ".." in listed.parts else listed.as_posix()
        sources.append(ImageSource(name, partial(path.read_bytes)))
    return sources


def _check_names(sources: Sequence[ImageSource]) -> None:
    """DataError for two images with one name (one output file) or a name that leaves the output folder."""
    seen: set[str] = set()
    for source in sources:
        parts = Path(source.name).parts
        if not parts or Path(source.name).is_absolute() or ".." in parts:
            raise DataError(f"image name {source.name!r} is not a relative path inside the output folder")
        if source.name in seen:
            raise DataError(f"two images are named {source.name!r}: both would write {source.name}.npz; "
                            f"give them apart (e.g. the folder above them)")
        seen.add(source.name)


def load_image(data: bytes) -> Image.Image:
    """Decode an encoded image into RGB, EXIF orientation applied (palette, alpha, grayscale, 16-bit, CMYK too)."""
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now: a truncated or corrupt file fails here
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB, from any PIL mode: palette (with transparency), alpha, grayscale, 16-bit, CMYK."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what PIL asks for a palette with transparency
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):  # 16-bit / integer / float grayscale
        values = np.asarray(image, dtype=np.float64)
        sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255)
        values = values / 257 if sixteen_bit else values  # 16-bit PNGs open as I;16 (or I in older Pillow)
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


# ----------------------------------------------------------------------------- weights

def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_url(backbone: str, name: str) -> str:
    """The download URL of torchvision weights `name` (ResNet50_Weights.IMAGENET1K_V2, or IMAGENET1K_V2 / DEFAULT
    of BACKBONE); ConfigError for a name that is not BACKBONE's."""
    enum, urls, default = TORCHVISION_WEIGHTS[backbone]
    match = _WEIGHTS_NAME.match(name)
    if match and match.group(1) not in (None, enum):
        owner = next((b for b, (e, _, _) in TORCHVISION_WEIGHTS.items() if e == match.group(1)), None)
        raise ConfigError(f"BACKBONE_WEIGHTS {name} are {owner or 'another model'}'s weights, but BACKBONE is "
                          f"{backbone}: set BACKBONE {owner} too, or use {enum}.{default}" if owner else
                          f"BACKBONE_WEIGHTS {name} is not a weights name of BACKBONE {backbone}; use {enum}.{default}")
    version = match.group(2) if match else None
    version = default if version == "DEFAULT" else version
    if version in urls:
        return urls[version]
    try:  # a newer torchvision may know more versions
        from torchvision.models import get_weight

        return get_weight(f"{enum}.{version}" if match else name).url
    except Exception as e:  # not installed, or not importable beside this torch, or no such name
        log.debug("torchvision does not resolve %s: %s", name, e)
    known = ", ".join(f"{enum}.{v}" for v in urls)
    raise ConfigError(f"BACKBONE_WEIGHTS {name!r}: no such file, and not a torchvision weights name of BACKBONE "
                      f"{backbone} (known: {known}, {enum}.DEFAULT); give a state-dict file with --weights FILE")


def _download(url: str, name: str, verbose: bool) -> tuple[dict[str, Any], Path]:
    """torchvision's weights at `url` (fetched once into torch.hub's cache, hash checked) and the cached file."""
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=verbose, check_hash=True,
                                                   weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:  # offline (URLError is an OSError), bad hash, torn download
        raise ConfigError(f"BACKBONE_WEIGHTS {name}: cannot download {url} ({e}); on a machine without the "
                          f"network, fetch that file elsewhere and pass it: --weights FILE") from e
    return state, Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name


def _read_state_dict(path: Path) -> dict[str, Any]:
    """A state dict saved with torch.save(model.state_dict()); DataError for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling, zip and I/O errors of a file that is not a state dict
        raise DataError(f"cannot read weights {path} ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                        f"expected a state dict saved with torch.save(model.state_dict())") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"weights {path} hold a {type(state).__name__}, not a state dict of tensors; save them with "
                        f"torch.save(model.state_dict())")
    return state


def load_weights(model: ResNet, state: dict[str, torch.Tensor], backbone: str, where: str,
                 dtype: torch.dtype = torch.float32) -> ResNet:
    """`model` (on the meta device) holding `state`, loaded strictly, in eval mode with `dtype` parameters;
    DataError naming missing, unexpected or mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    problems = [f"missing keys {first(missing)}" if missing else "",
                f"unexpected keys {first(unexpected)}" if unexpected else "",
                f"other shapes: {first(shapes)}" if shapes else ""]
    if any(problems):
        raise DataError(f"weights {where} do not load strictly into BACKBONE {backbone}: "
                        f"{'; '.join(p for p in problems if p)}; give the weights of a torchvision {backbone} "
                        f"(its state_dict), or set BACKBONE to the model they were saved from")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).requires_grad_(False).eval()


# ----------------------------------------------------------------------------- the extractor

class Resize(NamedTuple):
    """EXTRACT_RESIZE: `square` resizes to size x size; `short` resizes the shorter side to size, shape kept."""

    kind: str
    size: int

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing, as torchvision's Resize computes it."""
        if self.kind == "square":
            return self.size, self.size
        if width <= height:
            return self.size, int(self.size * height / width)
        return int(self.size * width / height), self.size

    def __str__(self) -> str:
        return f"{self.kind}:{self.size}"


def parse_resize(text: str) -> Resize:
    """'square:448' or 'short:600' -> Resize; ConfigError otherwise."""
    kind, _, size = str(text).partition(":")
    if kind not in ("square", "short") or not size.isdigit() or int(size) < 1:
        raise ConfigError(f"EXTRACT_RESIZE {text!r}: expected square:N (N x N) or short:N (shorter side N), "
                          f"e.g. square:448")
    return Resize(kind, int(size))


class Prepared(NamedTuple):
    """One image resized for the backbone: (H', W', 3) uint8 pixels and its original size."""

    pixels: np.ndarray
    image_w: int
    image_h: int

    @property
    def size(self) -> tuple[int, int]:
        """(H', W'): images of one size share a batch."""
        return self.pixels.shape[0], self.pixels.shape[1]


def grid_boxes(image_w: int, image_h: int, resized_w: int, resized_h: int, rows: int, cols: int,
               stride: int) -> np.ndarray:
    """(rows * cols, 4) float32: each grid cell (row-major) as x1, y1, x2, y2 in the original image's pixels.

    Cell (i, j) covers the resized image's pixels [j * stride, (j + 1) * stride) across, cut at its edge; the
    cells tile the whole image.
    """
    xs = np.minimum(np.arange(cols + 1) * stride, resized_w) * (image_w / resized_w)
    ys = np.minimum(np.arange(rows + 1) * stride, resized_h) * (image_h / resized_h)
    x1, y1 = np.meshgrid(xs[:-1], ys[:-1])
    x2, y2 = np.meshgrid(xs[1:], ys[1:])
    return np.stack([x1.ravel(), y1.ravel(), x2.ravel(), y2.ravel()], axis=1).astype(np.float32)


class Extractor:
    """A backbone with its weights and preprocessing: images -> one features dict (`.npz` keys) per image."""

    def __init__(self, model: ResNet, backbone: str, layer: str, resize: Resize, device: torch.device,
                 weights: str, weights_sha256: str, channels_last: bool = True) -> None:
        self.model, self.backbone, self.layer, self.resize, self.device = model, backbone, layer, resize, device
        self.stride, self.feat_size = LAYERS[layer][1], LAYERS[layer][2]
        self.spec = {"backbone": backbone, "layer": layer, "resize": str(resize), "weights": weights,
                     "weights_sha256": weights_sha256, "feat_size": self.feat_size}
        self.channels_last = channels_last  # faster convolutions (benchmarks/extract_speed.py measures both)
        self.model = self.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def from_config(cls, cfg: Config, device: str | None = None) -> Extractor:
        """Check BACKBONE, BACKBONE_LAYER, EXTRACT_RESIZE, EXTRACT_BATCH_SIZE and BACKBONE_WEIGHTS, load the weights
        (a file, or torchvision's by name) on `device` (default: DEVICE, auto -> cuda when available)."""
        backbone, layer, weights = cfg.BACKBONE, cfg.BACKBONE_LAYER, str(cfg.BACKBONE_WEIGHTS or "").strip()
        if backbone not in BACKBONES:
            close = difflib.get_close_matches(str(backbone), list(BACKBONES), n=1)
            raise ConfigError(f"BACKBONE {backbone!r} is not a known backbone"
                              + (f"; did you mean {close[0]}?" if close else "") + f" (one of {', '.join(BACKBONES)})")
        if layer not in LAYERS:
            raise ConfigError(f"BACKBONE_LAYER {layer!r}: expected c5 (layer4, 2048-d) or c4 (layer3, 1024-d)")
        resize = parse_resize(cfg.EXTRACT_RESIZE)
        if cfg.EXTRACT_BATCH_SIZE < 1:
            raise ConfigError(f"EXTRACT_BATCH_SIZE must be at least 1, got {cfg.EXTRACT_BATCH_SIZE}")
        if not weights:
            raise ConfigError(f"extracting features needs the backbone's weights: pass --weights FILE (a {backbone} "
                              f"state dict saved by torchvision) or set BACKBONE_WEIGHTS (a file, or a torchvision "
                              f"weights name such as {TORCHVISION_WEIGHTS[backbone][0]}.DEFAULT)")
        target = torch.device(device) if device is not None else setup_runtime(cfg).device
        if Path(weights).is_file():
            path = Path(weights)
            state, shown = _read_state_dict(path), str(path.resolve())
        else:
            state, path = _download(weights_url(backbone, weights), weights, cfg.VERBOSE)
            shown = weights
        model = load_weights(build_backbone(backbone), state, backbone, shown)
        log.info("extractor: %s up to %s, weights %s, resize %s, on %s", backbone, layer, shown, resize, target)
        return cls(model.to(target), backbone, layer, resize, target, shown, file_sha256(path))

    def prepare(self, image: Image.Image) -> Prepared:
        """An image made RGB and resized as EXTRACT_RESIZE says (bilinear, antialiased: torchvision's Resize on PIL)."""
        image = to_rgb(image)
        width, height = self.resize.output_size(*image.size)
        resized = image.resize((width, height), Image.BILINEAR)
        return Prepared(np.asarray(resized, dtype=np.uint8), image.width, image.height)

    @torch.inference_mode()
    def run(self, batch: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        """Features of prepared images that share one size: one `.npz` dict each."""
        pixels = torch.from_numpy(np.stack([p.pixels for p in batch])).to(self.device)  # (B, H', W', 3) uint8
        x = pixels.permute(0, 3, 1, 2).float().div(255).sub(self._mean).div(self._std)  # as ToTensor + Normalize
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        maps = self.model(x, self.layer).float().cpu().numpy()  # (B, D, rows, cols)
        rows, cols = maps.shape[2:]
        height, width = batch[0].size
        out = []
        for image, grid in zip(batch, maps):
            boxes = grid_boxes(image.image_w, image.image_h, width, height, rows, cols, self.stride)
            out.append({"x": np.ascontiguousarray(grid.reshape(self.feat_size, rows * cols), dtype=np.float32),
                        "bbox": boxes, "image_w": np.asarray(image.image_w), "image_h": np.asarray(image.image_h),
                        "num_bbox": np.asarray(rows * cols)})
        return out

    def features(self, images: list[Image.Image]) -> list[dict[str, np.ndarray]]:
        """One features dict (x (D, N), bbox (N, 4), image_w, image_h, num_bbox) per image (any mode), in order."""
        prepared = [self.prepare(image) for image in images]
        out: list[dict[str, np.ndarray] | None] = [None] * len(images)
        for size in dict.fromkeys(p.size for p in prepared):
            chosen = [i for i, p in enumerate(prepared) if p.size == size]
            for i, result in zip(chosen, self.run([prepared[i] for i in chosen])):
                out[i] = result
        return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the folder

@dataclass
class ExtractSummary:
    """What one extraction did: images written, already there (skipped), bad ones with the reason, seconds."""

    done: int = 0
    skipped: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Images extracted per second of the run."""
        return self.done / self.seconds if self.seconds > 0 else 0.0


def output_file(out_dir: Path, name: str) -> Path:
    """Where the features of image `name` go: <out_dir>/<name>.npz."""
    return Path(out_dir) / f"{name}.npz"


def _claim_folder(out_dir: Path, spec: dict[str, Any], existing: int) -> None:
    """Write <out_dir>/extractor.json, or check that the one there records the same extractor (the weights'
    path may differ: their sha256 identifies them); DataError for another extractor's or unknown features."""
    path = out_dir / SPEC_FILE
    if not path.exists():
        if existing:
            raise DataError(f"{out_dir} already holds {existing} of these images' .npz files but no {SPEC_FILE}: "
                            f"features of an unknown extractor; extract into another --out folder")
        write_json_atomic(path, spec)
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); it records which extractor wrote this folder") from e
    differ = [k for k in spec if k != "weights" and recorded.get(k) != spec[k]]
    if differ:
        diff = ", ".join(f"{k} {recorded.get(k)!r} there, {spec[k]!r} now" for k in differ)
        raise DataError(f"{out_dir} holds features of another extractor ({diff}; {path}); one folder never mixes "
                        f"two: extract into another --out folder, or delete this one to redo it")


def _save_npz(f: Any, arrays: dict[str, np.ndarray]) -> None:
    np.savez(f, **arrays)


def _reason(e: BaseException) -> str:
    """A bad image's reason, one line."""
    if isinstance(e, UnidentifiedImageError):  # its message names a BytesIO object, not the file
        return "UnidentifiedImageError: not an image, or in a format PIL cannot read"
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def extract(sources: Sequence[ImageSource], out_dir: Path, extractor: Extractor, batch_size: int,
            verbose: bool) -> ExtractSummary:
    """Write <out_dir>/<name>.npz for every image not there yet, in batches of images of one resized size; a bad
    image (unreadable, corrupt, truncated, not an image) is named in the summary and skipped."""
    started, out_dir = time.perf_counter(), Path(out_dir)
    _check_names(sources)
    summary = ExtractSummary()
    todo = [s for s in sources if not output_file(out_dir, s.name).exists()]
    summary.skipped = len(sources) - len(todo)
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim_folder(out_dir, extractor.spec, summary.skipped)
    bar = progress(total=len(todo), desc="extract", every=max(1, len(todo) // 10), disable=not verbose)

    def write(bucket: list[tuple[ImageSource, Prepared]]) -> None:
        for (source, _), arrays in zip(bucket, extractor.run([p for _, p in bucket])):
            path = output_file(out_dir, source.name)
            try:
                atomic_write(path, partial(_save_npz, arrays=arrays))
            except OSError as e:
                raise DataError(f"cannot write features {path}: {e}") from e
        summary.done += len(bucket)
        bar.update(len(bucket))

    buckets: dict[tuple[int, int], list[tuple[ImageSource, Prepared]]] = {}  # resized size -> images waiting
    for source in todo:
        try:
            prepared = extractor.prepare(load_image(source.read()))
        except Exception as e:  # whatever PIL or the reader raises for a bad image: named, skipped
            summary.bad.append((source.name, _reason(e)))
            log.warning("bad image %s skipped: %s", source.name, _reason(e))
            bar.update(1)
            continue
        bucket = buckets.setdefault(prepared.size, [])
        bucket.append((source, prepared))
        if len(bucket) >= batch_size:
            write(buckets.pop(prepared.size))
        elif sum(map(len, buckets.values())) > 4 * batch_size:  # many sizes (short:N): bound what waits
            write(buckets.pop(max(buckets, key=lambda size: len(buckets[size]))))
    for bucket in buckets.values():
        write(bucket)
    bar.close()
    summary.seconds = time.perf_counter() - started
    return summary


def main(cfg: Config, args: Any) -> int:
    """`accuvqa extract IMAGES... --out DIR [--weights FILE]`: extract, print a summary; 2 when no image was."""
    if args.weights:
        cfg = cfg.replace(BACKBONE_WEIGHTS=args.weights)
    sources = sources_from_paths([Path(p) for p in args.images])
    if not sources:
        raise DataError(f"no images found in {', '.join(args.images)} (image suffixes: {' '.join(IMAGE_SUFFIXES)})")
    extractor = Extractor.from_config(cfg)
    summary = extract(sources, Path(args.out), extractor, cfg.EXTRACT_BATCH_SIZE, cfg.VERBOSE)
    rows: dict[str, Any] = {
        "images": len(sources), "extracted": summary.done, "already there": summary.skipped,
        "bad": len(summary.bad), "seconds": f"{summary.seconds:.1f}", "images/s": f"{summary.images_per_s:.2f}",
        "extractor": f"{extractor.backbone} {extractor.layer} ({extractor.feat_size}-d), {extractor.resize}",
        "weights": extractor.spec["weights"], "features": str(args.out)}
    rows.update({f"bad: {name}": reason for name, reason in summary.bad})
    print_table(f"extract: {len(sources)} images -> {args.out}", rows)
    if len(summary.bad) == len(sources):
        raise DataError(f"none of the {len(sources)} images could be read (each is named above with the reason)")
    return 0
