"""Images per second of `accuvqa extract` at its defaults (resnet50, c5, square:448, batch 8) on this machine.

    .venv/bin/python benchmarks/extract_speed.py [--images 32] [--threads 0] [--device auto] [--size 640x480]

Writes --images random JPEGs of --size (COCO's typical 640 x 480) and a resnet50 state dict with torchvision's
keys (He-initialised random weights: the speed does not depend on their values) into a temporary folder, then
runs `accuvqa.extract.extract` over them twice, with the backbone in channels_last and in contiguous memory
(the same weights and images, a fresh output folder each), after one warm-up batch. Prints images/s of each:
decoding, resizing, the forward pass and the atomic .npz writes included. --threads 0 keeps torch's default.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from accuvqa.backbone import build_backbone
from accuvqa.config import load_config
from accuvqa.extract import Extractor, extract, sources_from_paths


def random_weights(path: Path) -> None:
    """A resnet50 state dict with torchvision's keys: He-normal convolutions, identity BatchNorm."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in build_backbone("resnet50").state_dict().items():
        shape = tuple(value.shape)
        if not value.dtype.is_floating_point:
            state[key] = torch.zeros(shape, dtype=value.dtype)
        elif len(shape) > 1:
            state[key] = torch.randn(shape, generator=gen) * math.sqrt(2 / math.prod(shape[1:]))
        else:
            state[key] = torch.ones(shape) if key.endswith(("weight", "running_var")) else torch.zeros(shape)
    torch.save(state, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", default="640x480")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"{i:04d}.jpg", quality=90)
        random_weights(root / "resnet50.pth")
        cfg = load_config(overrides={"BACKBONE_WEIGHTS": str(root / "resnet50.pth"), "NUM_THREADS": args.threads,
                                     "DEVICE": args.device, "VERBOSE": False})
        base = Extractor.from_config(cfg)
        sources = sources_from_paths([root / "images"])
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, device {base.device}; {args.images} JPEGs {width}x{height}, "
              f"{cfg.BACKBONE} {cfg.BACKBONE_LAYER} {cfg.EXTRACT_RESIZE}, batch {cfg.EXTRACT_BATCH_SIZE}")
        for channels_last in (True, False):
            ex = Extractor(base.model, base.backbone, base.layer, base.resize, base.device, base.spec["weights"],
                           base.spec["weights_sha256"], channels_last=channels_last)
            extract(sources[:cfg.EXTRACT_BATCH_SIZE], root / f"warm{channels_last}", ex, cfg.EXTRACT_BATCH_SIZE, False)
            summary = extract(sources, root / f"out{channels_last}", ex, cfg.EXTRACT_BATCH_SIZE, False)
            print(f"  {'channels_last' if channels_last else 'contiguous':<14} {summary.images_per_s:6.2f} images/s "
                  f"({summary.done} images in {summary.seconds:.1f} s)")


if __name__ == "__main__":
    main()
