"""Generate tests/data/torchvision_resnet/ by running torchvision's OWN models/resnet.py as plain Python.

Not run by the tests (they need only the stored files). How it was run (from the worktree root; torchvision
cannot be imported beside the CPU torch here, so only its source file is used, its package imports stubbed
below):

    # torchvision 0.29.1's source, from its wheel (or: git --git-dir <vision clone>/.git show
    # HEAD:torchvision/models/resnet.py > .cache/vision/torchvision/models/resnet.py)
    .venv/bin/python -m pip download torchvision==0.29.1 --no-deps -d .cache/tvwheel
    mkdir -p .cache/vision && unzip -o -q .cache/tvwheel/torchvision-0.29.1-*.whl \\
        torchvision/models/resnet.py torchvision/version.py -d .cache/vision
    .venv/bin/python tests/data/make_torchvision_reference.py .cache/vision/torchvision/models/resnet.py

(torch 2.13 CPU.) It writes, into tests/data/torchvision_resnet/ (about 200 KB):
- `reference.npz`: `input` (1, 3, 64, 32) float64, and for each of REFERENCE_BACKBONES the outputs of
  torchvision's own forward (captured by hooks on layer3 and layer4) in float64: `<backbone>_c4`
  (1, 1024, 4, 2) and `<backbone>_c5` (1, 2048, 2, 1), eval mode. The weights are not stored (a ResNet-50 is
  100 MB): `seeded_state_dict` draws them from SEED in sorted-key order, and the test draws them again for
  accuvqa's backbone by the same key names and shapes; `reference.json`'s `state_sha256` proves that both
  drew the same tensors.
- `reference.json`: `torchvision` (version), `seed`, `state_sha256` {backbone: sha256 of the weights},
  `structure` {backbone: {"keys": count, "sha256": of every key's name, shape and dtype}} for all eight
  backbones (built on the meta device: no memory), and `weights` {enum: {version: url, "DEFAULT": version}}:
  torchvision's ImageNet weights, which accuvqa.extract.TORCHVISION_WEIGHTS must list alike.

tests/test_extract.py loads the weights strictly into accuvqa.backbone and compares the maps (bound 1e-10
relative to the largest value, in float64).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import sys
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

SEED = 20250125
INPUT_SHAPE = (1, 3, 64, 32)  # H != W: a swapped axis shows
REFERENCE_BACKBONES = ("resnet50", "resnext50_32x4d")  # plain and grouped bottlenecks, full depth
ALL_BACKBONES = ("resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                 "wide_resnet50_2", "wide_resnet101_2")
OUT = Path(__file__).resolve().parent / "torchvision_resnet"


def seeded_state_dict(shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], seed: int) -> dict[str, torch.Tensor]:
    """Weights for a ResNet state dict's keys -> (shape, dtype), drawn from `seed` in sorted-key order (float64):
    convolutions He-scaled, BatchNorm scales and variances in [0.5, 1.5), shifts and means small: every
    parameter matters (the maps grow with depth, to about 1e4 at c5, which float64 carries exactly)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64) * std

    def uniform(shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)

    state = {}
    for key in sorted(shapes):
        shape, dtype = shapes[key]
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        if not dtype.is_floating_point:  # BatchNorm's num_batches_tracked: unused in eval mode
            state[key] = torch.zeros(shape, dtype=dtype)
        elif len(shape) == 4:  # convolution
            state[key] = normal(shape, math.sqrt(2 / fan_in))
        elif len(shape) == 2:  # fc
            state[key] = normal(shape, 1 / math.sqrt(fan_in))
        elif key.endswith(("running_var", ".weight")):
            state[key] = uniform(shape, 0.5, 1.5)
        else:  # running_mean, BatchNorm and fc biases
            state[key] = normal(shape, 0.1)
    return state


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, shape, dtype and bytes, in sorted-key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def structure_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every key's name, shape and dtype (no values: works on the meta device)."""
    text = "".join(f"{k} {tuple(v.shape)} {v.dtype}\n" for k, v in sorted(state.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (shape, dtype) of a state dict."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def reference_input() -> torch.Tensor:
    """The stored input, drawn from SEED (float64, roughly normalised pixels)."""
    return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(SEED + 1), dtype=torch.float64)


# ----------------------------------------------------------------------------- torchvision's resnet.py, stubbed

class _Weights:
    """Stand-in for torchvision.models._api.Weights: keeps its arguments."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


class _WeightsEnum:
    """Stand-in for torchvision.models._api.WeightsEnum: a plain class of _Weights attributes."""

    @classmethod
    def verify(cls, obj: Any) -> Any:
        return obj


def _overwrite_named_param(kwargs: dict[str, Any], param: str, new_value: Any) -> None:
    kwargs[param] = new_value


def _stub_torchvision() -> None:
    """The modules torchvision's resnet.py imports from its own package, minimal: nothing of them is used to
    build or run a model without weights."""
    modules = {name: types.ModuleType(name) for name in (
        "torchvision", "torchvision.models", "torchvision.transforms", "torchvision.transforms._presets",
        "torchvision.utils", "torchvision.models._api", "torchvision.models._meta", "torchvision.models._utils")}
    for package in ("torchvision", "torchvision.models", "torchvision.transforms"):
        modules[package].__path__ = []
    modules["torchvision.transforms._presets"].ImageClassification = lambda *args, **kwargs: None
    modules["torchvision.utils"]._log_api_usage_once = lambda obj: None
    api = modules["torchvision.models._api"]
    api.register_model, api.Weights, api.WeightsEnum = (lambda name=None: (lambda fn: fn)), _Weights, _WeightsEnum
    modules["torchvision.models._meta"]._IMAGENET_CATEGORIES = [f"class {i}" for i in range(1000)]
    utils = modules["torchvision.models._utils"]
    utils._ovewrite_named_param = _overwrite_named_param
    utils.handle_legacy_interface = lambda **weights: (lambda fn: fn)
    sys.modules.update(modules)


def load_torchvision_resnet(path: Path) -> types.ModuleType:
    """torchvision's models/resnet.py at `path`, imported as torchvision.models.resnet over the stubs."""
    _stub_torchvision()
    spec = importlib.util.spec_from_file_location("torchvision.models.resnet", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def torchvision_maps(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchvision's own forward of `x`, with layer3 (c4) and layer4 (c5) outputs captured by hooks."""
    maps: dict[str, torch.Tensor] = {}
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, out, k=k: maps.__setitem__(k, out.clone()))
             for name, k in (("layer3", "c4"), ("layer4", "c5"))]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return maps


def main(resnet_py: Path) -> None:
    tv = load_torchvision_resnet(resnet_py)
    version_file = resnet_py.parent.parent / "version.py"
    found = re.search(r"__version__ = '([^']+)'", version_file.read_text()) if version_file.exists() else None
    version = found.group(1) if found else "unknown"
    arrays = {"input": reference_input().numpy()}
    record: dict[str, Any] = {"torchvision": version, "seed": SEED, "input_shape": list(INPUT_SHAPE),
                              "state_sha256": {}, "structure": {}, "weights": {}}
    for name in ALL_BACKBONES:
        with torch.device("meta"):
            state = getattr(tv, name)().state_dict()
        record["structure"][name] = {"keys": len(state), "sha256": structure_sha256(state)}
    for name in REFERENCE_BACKBONES:
        model = getattr(tv, name)().double().eval()
        state = seeded_state_dict(shapes_of(model.state_dict()), SEED)
        model.load_state_dict(state, strict=True)
        record["state_sha256"][name] = state_sha256(state)
        for layer, value in torchvision_maps(model, reference_input()).items():
            arrays[f"{name}_{layer}"] = value.numpy()
        print(name, {k: v.shape for k, v in arrays.items() if k.startswith(name)})
    for enum_name in dir(tv):
        enum = getattr(tv, enum_name)
        if isinstance(enum, type) and issubclass(enum, _WeightsEnum) and enum is not _WeightsEnum:
            versions = {k: v.url for k, v in vars(enum).items() if isinstance(v, _Weights) and k != "DEFAULT"}
            default = next(k for k, v in versions.items() if v == enum.DEFAULT.url)
            record["weights"][enum_name] = {**versions, "DEFAULT": default}
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "reference.npz", **arrays)
    (OUT / "reference.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT} ({sum(p.stat().st_size for p in OUT.iterdir())} bytes)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
