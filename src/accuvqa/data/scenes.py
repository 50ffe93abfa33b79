"""A bundled CLEVR-style reasoning set that needs no download: scenes drawn with PIL/NumPy, questions from
CLEVR's families with their functional programs, written in CLEVR's JSON schema, and object features found
from the pixels by colour (no detector, no weights).

Each image holds `min_objects`..`max_objects` objects, each with a colour (CLEVR's 8), a shape (cube: a
square, sphere: a circle, cylinder: a narrow upright body with round ends), a size (small, large) and a
material (rubber: flat colour; metal: a diagonal shading gradient and a highlight). Objects are drawn back to
front (smaller y is farther), so they may occlude each other, but each stays decidable from the pixels: at
least `1 - max_occlusion` of it visible, its visible extent equal to its full extent, one connected piece,
and never touching an object of its colour. A scene whose pixels do not give back one region per object is
drawn again.

Layout under `root` (CLEVR v1.0's, plus the features):
  images/<split>/CLEVR_<split>_<6-digit index>.png
  questions/CLEVR_<split>_questions.json   {"info", "questions": [{image_index, image_filename, question,
                                            answer, question_family_index, program, split, question_index}]}
  scenes/CLEVR_<split>_scenes.json         {"info", "scenes": [{image_index, image_filename, split, objects
                                            [{color, shape, size, material, 3d_coords, pixel_coords,
                                            rotation}], relationships {left, right, front, behind}}]}
  feats/<split>/<image_index>.npz          x (FEAT_SIZE, N), bbox (N, 4), image_w, image_h, num_bbox
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from accuvqa.errors import DataError
from accuvqa.files import atomic_write, write_json_atomic

COLORS: dict[str, tuple[int, int, int]] = {  # CLEVR's colours and RGB values
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
SHAPES = ("cube", "sphere", "cylinder")
SIZES = ("small", "large")
MATERIALS = ("rubber", "metal")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": SIZES, "color": tuple(COLORS), "material": MATERIALS, "shape": SHAPES,
}
FILTER_ORDER = ("size", "color", "material", "shape")  # CLEVR's order of filters in a program

BACKGROUND = (222, 220, 214)
_RADIUS = {"small": 0.055, "large": 0.1}  # half-height of an object, as a fraction of the image side
_CYLINDER_HALF_WIDTH = 0.62  # a cylinder's half-width, times its half-height
_SHADE = (0.62, 1.38)  # metal's brightness gradient, end to end
_HIGHLIGHT = 0.5  # metal's highlight: the strongest blend towards white
_MIN_REGION = 8  # pixels: smaller colour components are noise, not objects

# ----------------------------------------------------------------------------- drawing


@dataclass
class SceneObject:
    """One object of a scene: its attributes and where it is drawn (pixel centre, half-height)."""

    color: str
    shape: str
    size: str
    material: str
    x: float
    y: float

    def radius(self, image_size: int) -> float:
        """Half-height in pixels."""
        return _RADIUS[self.size] * image_size

    def mask(self, image_size: int) -> np.ndarray:
        """(H, W) bool: the pixels the object covers when nothing hides it."""
        r = self.radius(image_size)
        c = np.arange(image_size) + 0.5
        dx, dy = np.abs(c[None, :] - self.x), np.abs(c[:, None] - self.y)
        if self.shape == "cube":
            return (dx <= r) & (dy <= r)
        if self.shape == "sphere":
            return dx ** 2 + dy ** 2 <= r ** 2
        a, e = _CYLINDER_HALF_WIDTH * r, 0.3 * r  # body half-width, end-cap half-height
        body = (dx <= a) & (dy <= r - e)
        caps = (dx / a) ** 2 + ((dy - (r - e)) / e) ** 2 <= 1.0
        return body | caps


def _shading(obj: SceneObject, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Brightness factor and blend-to-white of each pixel (H, W): flat for rubber; gradient + highlight for metal."""
    if obj.material == "rubber":
        return np.ones((image_size, image_size)), np.zeros((image_size, image_size))
    r = obj.radius(image_size)
    c = np.arange(image_size) + 0.5
    u = ((c[None, :] - obj.x) + (c[:, None] - obj.y)) / (4 * r) + 0.5  # 0 top-left .. 1 bottom-right
    shade = _SHADE[0] + (_SHADE[1] - _SHADE[0]) * np.clip(u, 0, 1)
    hx, hy, hr = obj.x + 0.35 * r, obj.y + 0.35 * r, 0.45 * r
    d = np.sqrt((c[None, :] - hx) ** 2 + (c[:, None] - hy) ** 2) / hr
    return shade, _HIGHLIGHT * np.clip(1 - d, 0, 1)


def render(objects: Sequence[SceneObject], image_size: int,
           rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 pixels and (H, W) int index map (-1 background) of objects drawn back to front;
    sensor noise from `rng` (None: none)."""
    c = np.arange(image_size) + 0.5
    floor = 1.0 + 0.03 * (c[:, None] / image_size - 0.5)  # a faint light fall-off on the floor
    rgb = np.broadcast_to(np.array(BACKGROUND, float) * floor[..., None], (image_size, image_size, 3)).copy()
    index = np.full((image_size, image_size), -1, dtype=np.int64)
    for i in sorted(range(len(objects)), key=lambda k: (objects[k].y, k)):
        obj = objects[i]
        mask = obj.mask(image_size)
        shade, white = _shading(obj, image_size)
        colour = np.array(COLORS[obj.color], float)
        pix = np.clip(colour * shade[..., None], 0, 255) * (1 - white[..., None]) + 255 * white[..., None]
        rgb[mask] = pix[mask]
        index[mask] = i
    if rng is not None:
        rgb += rng.normal(0, 2.0, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), index


# ----------------------------------------------------------------------------- features from the pixels

FEAT_SIZE = 48
_LUT_BITS = 5
_LARGE_MIN_HEIGHT = (_RADIUS["small"] + _RADIUS["large"])  # box height between the two sizes, side = 1


def _prototypes() -> tuple[np.ndarray, np.ndarray]:
    """RGB of every way a colour can be drawn (rubber, metal's shades and highlights) and its label (0: floor)."""
    protos, labels = [], []
    for k in np.linspace(0.96, 1.04, 5):
        protos.append(np.array(BACKGROUND, float) * k)
        labels.append(0)
    for label, colour in enumerate(COLORS.values(), start=1):
        for s in np.linspace(_SHADE[0], _SHADE[1], 15):
            for h in np.linspace(0, _HIGHLIGHT, 11):
                protos.append(np.clip(np.array(colour, float) * s, 0, 255) * (1 - h) + 255 * h)
                labels.append(label)
    return np.array(protos), np.array(labels)


_LUT: np.ndarray | None = None


def _colour_lut() -> np.ndarray:
    """Label (0 floor, 1..8 colour) of each RGB quantised to _LUT_BITS bits per channel: the nearest prototype."""
    global _LUT
    if _LUT is None:
        protos, labels = _prototypes()
        levels = (np.arange(2 ** _LUT_BITS) + 0.5) * 2 ** (8 - _LUT_BITS)
        grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
        d = (protos ** 2).sum(1)[None, :] - 2 * grid @ protos.T  # squared distance less |grid|^2
        _LUT = labels[d.argmin(1)].astype(np.int8)
    return _LUT


def colour_labels(rgb: np.ndarray) -> np.ndarray:
    """(H, W) colour label of each pixel: 0 floor, k = the k-th of COLORS (from 1)."""
    q = rgb.astype(np.int64) >> (8 - _LUT_BITS)
    return _colour_lut()[(q[..., 0] << (2 * _LUT_BITS)) | (q[..., 1] << _LUT_BITS) | q[..., 2]].astype(np.int64)


def connected_components(labels: np.ndarray) -> np.ndarray:
    """(H, W) component id (0 for label 0) of 4-connected pixels of equal non-zero label; ids are 1-based."""
    h, w = labels.shape
    fg = labels > 0
    big = h * w + 1
    ids = np.where(fg, np.arange(1, h * w + 1).reshape(h, w), big)
    same_right = fg[:, :-1] & (labels[:, :-1] == labels[:, 1:])
    same_down = fg[:-1, :] & (labels[:-1, :] == labels[1:, :])
    while True:
        new = ids.copy()
        np.minimum(new[:, :-1], np.where(same_right, ids[:, 1:], big), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(same_right, ids[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:-1, :], np.where(same_down, ids[1:, :], big), out=new[:-1, :])
        np.minimum(new[1:, :], np.where(same_down, ids[:-1, :], big), out=new[1:, :])
        flat = np.append(new.ravel(), big)  # pointer jumping: take the id that the id's own pixel holds
        new = np.where(fg, np.minimum(new, flat[np.minimum(new, big) - 1]), big)
        if np.array_equal(new, ids):
            break
        ids = new
    roots, inverse = np.unique(np.where(fg, ids, 0), return_inverse=True)
    return inverse.reshape(h, w) + (0 if roots[0] == 0 else 1)


def object_features(rgb: np.ndarray, floor: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features `x` (FEAT_SIZE, N), stored (D, N) as mcan-vqa, and boxes (N, 4) of the objects found by colour.

    One region per connected component of one colour (at least _MIN_REGION pixels), in scan order, then (with
    `floor`) one region for the floor. Lengths are relative to the image side. Row layout (D = 48):
      0-7   colour one-hot (CLEVR's 8 colours, from the pixel classes)
      8-10  shape one-hot (cube, sphere, cylinder), 11-12 size one-hot (small, large), 13-14 material one-hot
            (rubber, metal): fixed rules on the measurements below (`_attributes`), no learned weights
      15    1 for an object region
      16-18 mean RGB (0..1)
      19-22 box x0, y0, x1, y1 (0..1); 23-24 box width, height; 25 sqrt(area)
      26    fill: own pixels / box; 27 fill with the other objects' pixels inside the box (what may hide it)
      28    aspect: width / (width + height)
      29-37 own pixels on a 3 x 3 grid inside the box
      38    brightness spread: std / mean of the object's brightness (metal's gradient and highlight)
      39    highlight: fraction of pixels much brighter than the object's median
      40-41 centroid x, y
      42    correlation of brightness with the diagonal position (metal's gradient)
      43-46 corner occupancy (2 x 2 pixels at each box corner: a cube's corners are full)
      47    1 for the floor region (whole image box, mean floor colour in 16-18, object coverage in 26)
    No row is all zero.
    """
    h, w, _ = rgb.shape
    side = float(max(h, w))
    labels = colour_labels(rgb)
    comps = connected_components(labels)
    brightness = rgb.astype(np.float64).mean(-1)
    rows, boxes = [], []
    for k in range(1, int(comps.max()) + 1):
        ys, xs = np.nonzero(comps == k)
        if len(xs) < _MIN_REGION:
            continue
        label = int(labels[ys[0], xs[0]])
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        own = comps[y0:y1, x0:x1] == k
        others = (labels[y0:y1, x0:x1] > 0) & ~own
        bw, bh = x1 - x0, y1 - y0
        row = np.zeros(FEAT_SIZE)
        row[label - 1] = 1.0
        row[15] = 1.0
        row[16:19] = rgb[ys, xs].mean(0) / 255.0
        row[19:23] = (x0 / side, y0 / side, x1 / side, y1 / side)
        row[23:25] = (bw / side, bh / side)
        row[25] = np.sqrt(len(xs)) / side
        row[26] = own.mean()
        row[27] = (own | others).mean()
        row[28] = bw / (bw + bh)
        cy = np.linspace(0, bh, 4).astype(int)
        cx = np.linspace(0, bw, 4).astype(int)
        row[29:38] = [own[cy[i]:max(cy[i + 1], cy[i] + 1), cx[j]:max(cx[j + 1], cx[j] + 1)].mean()
                      for i in range(3) for j in range(3)]
        b = brightness[ys, xs]
        row[38] = b.std() / max(b.mean(), 1.0)
        row[39] = (b > np.median(b) * 1.25 + 10).mean()
        row[40:42] = (xs.mean() / side, ys.mean() / side)
        u = (xs - xs.mean()) + (ys - ys.mean())
        row[42] = float(np.corrcoef(u, b)[0, 1]) if u.std() > 0 and b.std() > 0 else 0.0
        row[43:47] = [own[:2, :2].mean(), own[:2, -2:].mean(), own[-2:, :2].mean(), own[-2:, -2:].mean()]
        shape, size, material = _attributes(row)
        row[8 + SHAPES.index(shape)] = 1.0
        row[11 + SIZES.index(size)] = 1.0
        row[13 + MATERIALS.index(material)] = 1.0
        rows.append(row)
        boxes.append((x0, y0, x1, y1))
    if floor:
        row = np.zeros(FEAT_SIZE)
        ground = labels == 0
        row[16:19] = rgb[ground].mean(0) / 255.0 if ground.any() else 0.0
        row[19:23] = (0.0, 0.0, w / side, h / side)
        row[23:25] = (w / side, h / side)
        row[26] = 1.0 - ground.mean()
        row[47] = 1.0
        rows.append(row)
        boxes.append((0, 0, w, h))
    x = np.array(rows, dtype=np.float32).reshape(-1, FEAT_SIZE)
    return x.T.copy(), np.array(boxes, dtype=np.float32).reshape(-1, 4)


def _attributes(row: np.ndarray) -> tuple[str, str, str]:
    """Shape, size and material of one object row by fixed rules on its measurements (what makes them decidable)."""
    shape = "cylinder" if row[28] < 0.44 else ("cube" if row[43:47].mean() > 0.5 else "sphere")
    size = "large" if row[24] > _LARGE_MIN_HEIGHT else "small"
    material = "metal" if row[38] > 0.12 or row[42] > 0.5 else "rubber"
    return shape, size, material


GRID_FEAT_SIZE = 20


def grid_features(rgb: np.ndarray, cells: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The alternative measured against `object_features`: `cells` x `cells` grid cells (D = 20, (D, N)), boxes.

    Row: 9 colour-class fractions (floor + 8 colours), mean RGB, brightness std / mean, edge density
    (colour-class changes between neighbours), cell x0, y0, x1, y1, 1.
    """
    h, w, _ = rgb.shape
    labels = colour_labels(rgb)
    brightness = rgb.astype(np.float64).mean(-1)
    edges = np.zeros((h, w))
    edges[:, 1:] += labels[:, 1:] != labels[:, :-1]
    edges[1:, :] += labels[1:, :] != labels[:-1, :]
    ch, cw = h // cells, w // cells
    rows, boxes = [], []
    for i in range(cells):
        for j in range(cells):
            sl = (slice(i * ch, (i + 1) * ch), slice(j * cw, (j + 1) * cw))
            lab, b = labels[sl], brightness[sl]
            row = np.zeros(GRID_FEAT_SIZE)
            row[0:9] = np.bincount(lab.ravel(), minlength=9) / lab.size
            row[9:12] = rgb[sl].reshape(-1, 3).mean(0) / 255.0
            row[12] = b.std() / max(b.mean(), 1.0)
            row[13] = edges[sl].mean()
            row[14:18] = (j / cells, i / cells, (j + 1) / cells, (i + 1) / cells)
            row[19] = 1.0
            rows.append(row)
            boxes.append((j * cw, i * ch, (j + 1) * cw, (i + 1) * ch))
    return np.array(rows, dtype=np.float32).T.copy(), np.array(boxes, dtype=np.float32)


def decode_objects(x: np.ndarray, image_size: int) -> list[dict[str, Any]]:
    """The objects `object_features` found, read back from its rows (`x` (FEAT_SIZE, N); the floor row skipped):
    per region {color, shape, size, material, x, y (pixels)}."""
    out = []
    for row in x.T:
        if row[15] != 1.0:
            continue
        out.append({"color": list(COLORS)[int(row[0:8].argmax())], "shape": SHAPES[int(row[8:11].argmax())],
                    "size": SIZES[int(row[11:13].argmax())], "material": MATERIALS[int(row[13:15].argmax())], "x": float(row[40] * image_size), "y": float(row[41] * image_size)})
    return out


# ----------------------------------------------------------------------------- placing objects


def _index_map(masks: Sequence[np.ndarray], objects: Sequence[SceneObject], image_size: int) -> np.ndarray:
    """(H, W) index of the object seen at each pixel (-1 floor), objects painted back to front."""
    index = np.full((image_size, image_size), -1, dtype=np.int64)
    for i in sorted(range(len(objects)), key=lambda k: (objects[k].y, k)):
        index[masks[i]] = i
    return index


def _decidable(objects: Sequence[SceneObject], masks: Sequence[np.ndarray], index: np.ndarray,
               max_occlusion: float) -> bool:
    """Whether each object stays readable: mostly visible, full extent visible, one piece, apart from its colour."""
    for i, (obj, full) in enumerate(zip(objects, masks)):
        fy, fx = np.nonzero(full)
        y0, y1, x0, x1 = fy.min(), fy.max() + 1, fx.min(), fx.max() + 1
        visible = index[y0:y1, x0:x1] == i
        if visible.sum() < (1 - max_occlusion) * len(fy):
            return False
        if not (visible[0].any() and visible[-1].any() and visible[:, 0].any() and visible[:, -1].any()):
            return False  # the visible extent is not the full extent
        if connected_components(visible.astype(np.int64)).max() != 1:
            return False
        ys0, ys1, xs0, xs1 = max(y0 - 1, 0), y1 + 1, max(x0 - 1, 0), x1 + 1
        near = index[ys0:ys1, xs0:xs1]  # one pixel of floor between same-coloured objects
        vis = near == i
        grown = vis.copy()
        grown[1:] |= vis[:-1]
        grown[:-1] |= vis[1:]
        grown[:, 1:] |= vis[:, :-1]
        grown[:, :-1] |= vis[:, 1:]
        touching = set(np.unique(near[grown]).tolist()) - {-1, i}
        if any(objects[j].color == obj.color for j in touching):
            return False
    return True


def sample_scene(rng: np.random.Generator, image_size: int, min_objects: int, max_objects: int,
                 max_occlusion: float, tries: int = 60) -> tuple[list[SceneObject], np.ndarray, np.ndarray, np.ndarray]:
    """Objects placed one by one, each kept only when every object stays decidable; (objects, pixels, features,
    boxes)."""
    while True:
        n = int(rng.integers(min_objects, max_objects + 1))
        objects: list[SceneObject] = []
        masks: list[np.ndarray] = []
        for _ in range(n):
            for _ in range(tries):
                size = SIZES[rng.integers(len(SIZES))]
                r = _RADIUS[size] * image_size
                obj = SceneObject(color=list(COLORS)[rng.integers(len(COLORS))], shape=SHAPES[rng.integers(3)],
                                  size=size, material=MATERIALS[rng.integers(2)],
                                  x=float(rng.uniform(r + 2, image_size - r - 2)),
                                  y=float(rng.uniform(r + 2, image_size - r - 2)))
                mask = obj.mask(image_size)
                index = _index_map(masks + [mask], objects + [obj], image_size)
                if _decidable(objects + [obj], masks + [mask], index, max_occlusion):
                    objects.append(obj)
                    masks.append(mask)
                    break
            else:
                break
        if len(objects) != n:
            continue
        rgb, _ = render(objects, image_size, rng)
        x, boxes = object_features(rgb)
        if x.shape[1] == n + 1:  # the pixels give back one region per object (and the floor's)
            return objects, rgb, x, boxes


def scene_json(objects: Sequence[SceneObject], split: str, image_index: int, image_size: int) -> dict[str, Any]:
    """One scene in CLEVR's schema (3d_coords: ground-plane x, y and height; pixel_coords: x, y, depth)."""
    objs = []
    for o in objects:
        r = o.radius(image_size)
        objs.append({
            "color": o.color, "shape": o.shape, "size": o.size, "material": o.material,
            "3d_coords": [round(6 * o.x / image_size - 3, 4), round(6 * o.y / image_size - 3, 4),
                          round(r / image_size * 6, 4)],
            "pixel_coords": [int(round(o.x)), int(round(o.y)), round(float(image_size - o.y) / image_size, 4)],
            "rotation": 0.0,
        })
    n = len(objects)
    rel = {  # CLEVR: relationships[name][i] lists the objects that are <name> of object i
        "left": [[j for j in range(n) if objects[j].x < objects[i].x] for i in range(n)],
        "right": [[j for j in range(n) if objects[j].x > objects[i].x] for i in range(n)],
        "front": [[j for j in range(n) if objects[j].y > objects[i].y] for i in range(n)],
        "behind": [[j for j in range(n) if objects[j].y < objects[i].y] for i in range(n)],
    }
    return {"split": split, "image_index": image_index, "image_filename": image_filename(split, image_index),
            "objects": objs, "relationships": rel}


def image_filename(split: str, image_index: int) -> str:
    """CLEVR's image file name."""
    return f"CLEVR_{split}_{image_index:06d}.png"


# ----------------------------------------------------------------------------- programs


class ProgramError(DataError):
    """A program that cannot run on its scene (unique of a set that is not one object, an unknown function)."""


def execute(program: Sequence[dict[str, Any]], scene: dict[str, Any]) -> str:
    """Run a CLEVR functional program on a scene (CLEVR's schema); the answer as CLEVR writes it."""
    objects = scene["objects"]
    outputs: list[Any] = []
    for step, node in enumerate(program):
        fn, args, values = node["function"], [outputs[i] for i in node.get("inputs", [])], node.get("value_inputs", [])
        if fn == "scene":
            out: Any = list(range(len(objects)))
        elif fn.startswith("filter_"):
            attr = fn[len("filter_"):]
            out = [i for i in args[0] if objects[i][attr] == values[0]]
        elif fn == "unique":
            if len(args[0]) != 1:
                raise ProgramError(f"step {step} unique: {len(args[0])} objects, expected one")
            out = args[0][0]
        elif fn == "relate":
            out = sorted(scene["relationships"][values[0]][args[0]])
        elif fn.startswith("same_"):
            attr = fn[len("same_"):]
            out = [i for i in range(len(objects)) if i != args[0] and objects[i][attr] == objects[args[0]][attr]]
        elif fn == "union":
            out = sorted(set(args[0]) | set(args[1]))
        elif fn == "intersect":
            out = sorted(set(args[0]) & set(args[1]))
        elif fn == "count":
            out = len(args[0])
        elif fn == "exist":
            out = len(args[0]) > 0
        elif fn.startswith("query_"):
            out = objects[args[0]][fn[len("query_"):]]
        elif fn in ("equal_color", "equal_shape", "equal_size", "equal_material", "equal_integer"):
            out = args[0] == args[1]  # two queried values, or two counts
        elif fn == "less_than":
            out = args[0] < args[1]
        elif fn == "greater_than":
            out = args[0] > args[1]
        else:
            raise ProgramError(f"step {step}: unknown function {fn!r}")
        outputs.append(out)
    result = outputs[-1]
    if isinstance(result, bool):
        return "yes" if result else "no"
    return str(result)


def _filters_program(filters: dict[str, str], start: list[dict[str, Any]]) -> int:
    """Append scene + CLEVR-ordered filters to `start`; the index of the last node."""
    start.append({"function": "scene", "inputs": [], "value_inputs": []})
    for attr in FILTER_ORDER:
        if attr in filters:
            start.append({"function": f"filter_{attr}", "inputs": [len(start) - 1], "value_inputs": [filters[attr]]})
    return len(start) - 1


_NOUNS = {"cube": ("cube", "block"), "sphere": ("sphere", "ball"), "cylinder": ("cylinder",)}
_THING = ("thing", "object")
_SYN = {"large": ("large", "big"), "small": ("small", "tiny"), "metal": ("metal", "shiny"),
        "rubber": ("rubber", "matte")}


def _phrase(filters: dict[str, str], rng: random.Random, plural: bool) -> str:
    """'small red metal cubes' for a filter set; synonyms as CLEVR uses them."""
    words = [rng.choice(_SYN.get(filters[a], (filters[a],))) for a in ("size", "color", "material") if a in filters]
    noun = rng.choice(_NOUNS[filters["shape"]] if "shape" in filters else _THING)
    return " ".join(words + [noun + ("s" if plural else "")])


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


TEMPLATES: dict[str, tuple[str, ...]] = {  # family -> question texts; {A}/{B} plural sets, {X}/{Y} one object
    "count": ("How many {A} are there?", "What number of {A} are there?"),
    "exist": ("Are there any {A}?", "Is there {a X}?"),
    "equal_integer": ("Are there the same number of {A} and {B}?", "Is the number of {A} the same as the number of {B}?"),
    "less_than": ("Are there fewer {A} than {B}?", "Is the number of {A} less than the number of {B}?"),
    "greater_than": ("Are there more {A} than {B}?", "Is the number of {A} greater than the number of {B}?"),
    "query_color": ("What color is the {X}?", "The {X} is what color?"),
    "query_shape": ("What shape is the {X}?", "The {X} has what shape?"),
    "query_size": ("What size is the {X}?", "How big is the {X}?"),
    "query_material": ("What material is the {X}?", "What is the {X} made of?"),
    "equal_color": ("Does the {X} have the same color as the {Y}?", "Is the {X} the same color as the {Y}?"),
    "equal_shape": ("Does the {X} have the same shape as the {Y}?", "Is the {X} the same shape as the {Y}?"),
    "equal_size": ("Does the {X} have the same size as the {Y}?", "Is the {X} the same size as the {Y}?"),
    "equal_material": ("Is the {X} made of the same material as the {Y}?",
                       "Does the {X} have the same material as the {Y}?"),
}
FAMILIES = tuple(TEMPLATES)

# The data design (measured with benchmarks/reasoning_prototype.py and make demo; see clevr_shapes.yml): counts
# over 0..MAX_COUNT, although images hold 3..10 objects (exact counts of larger sets are what a small MCAN learns
# last). 60 questions per image; train asks the two-object comparisons more often (TRAIN_MIX), val and test ask
# the 13 families alike. At 20 questions per image, all families alike, 1500 train images (1,900-2,300 questions
# per equal_* family), a small MCAN memorised equal_* and stayed at chance on test after 16 epochs (54.6%); at 60
# per image with these weights (9,100-10,700 per equal_* family) it generalised: equal_* 99.7-100%. At 20 per
# image, a mix asking count and the comparisons more often (weights 4 and 2) learnt query_*, which every other
# family needs first, more slowly: 59% against 100% after 15 epochs (600 train images).
MAX_COUNT = 5
TRAIN_MIX: dict[str, int] = {  # family -> weight (1 where unnamed)
    "equal_color": 4, "equal_shape": 4, "equal_size": 4, "equal_material": 4,
    "equal_integer": 5, "less_than": 3, "greater_than": 3,
}
QUESTIONS_PER_IMAGE = 60


def family_index(family: str, template: int) -> int:
    """question_family_index of a family's template (2 templates per family, in TEMPLATES' order)."""
    return FAMILIES.index(family) * 2 + template


def family_of(program: Sequence[dict[str, Any]]) -> str:
    """A question's family: its program's last function (as openvqa's CLEVR scoring groups them)."""
    return program[-1]["function"]


def _random_filters(objects: Sequence[dict], rng: random.Random) -> dict[str, str]:
    """A filter set: often an existing object's attributes (so counts are not all 0), sometimes any values."""
    k = rng.choice((0, 1, 1, 2, 2, 3))
    attrs = rng.sample(FILTER_ORDER, k)
    if objects and rng.random() < 0.7:
        obj = rng.choice(objects)
        return {a: obj[a] for a in attrs}
    return {a: rng.choice(ATTRIBUTES[a]) for a in attrs}


def _count(filters: dict[str, str], objects: Sequence[dict]) -> int:
    """How many objects match every filter."""
    return sum(all(o[a] == v for a, v in filters.items()) for o in objects)


def _unique_filters(objects: Sequence[dict], target: int, rng: random.Random, exclude: str = "") -> dict | None:
    """A smallest random filter set (not using `exclude`) that picks out `target` alone; None when none does."""
    attrs = [a for a in FILTER_ORDER if a != exclude]
    for k in range(1, len(attrs) + 1):
        subsets = list(itertools.combinations(attrs, k))
        rng.shuffle(subsets)
        for subset in subsets:
            f = {a: objects[target][a] for a in subset}
            if _count(f, objects) == 1:
                return f
    return None


def make_question(family: str, scene: dict[str, Any], rng: random.Random,
                  max_count: int = MAX_COUNT) -> dict[str, Any] | None:
    """One candidate question of `family` on `scene` (text, program, answer); None when the draw fails or a set it
    counts (count, equal_integer, less_than, greater_than) has more than `max_count` objects."""
    objects = scene["objects"]
    template = rng.randrange(2)
    text = TEMPLATES[family][template]
    program: list[dict[str, Any]] = []
    if family in ("count", "exist"):
        fa = _random_filters(objects, rng)
        last = _filters_program(fa, program)
        program.append({"function": family, "inputs": [last], "value_inputs": []})
        if family == "count" and _count(fa, objects) > max_count:
            return None
        text = text.replace("{A}", _phrase(fa, rng, True)).replace("{a X}", _a(_phrase(fa, rng, False)))
    elif family in ("equal_integer", "less_than", "greater_than"):
        fa, fb = _random_filters(objects, rng), _random_filters(objects, rng)
        if fa == fb or max(_count(fa, objects), _count(fb, objects)) > max_count:
            return None
        a = _filters_program(fa, program)
        program.append({"function": "count", "inputs": [a], "value_inputs": []})
        ca = len(program) - 1
        b = _filters_program(fb, program)
        program.append({"function": "count", "inputs": [b], "value_inputs": []})
        program.append({"function": family, "inputs": [ca, len(program) - 1], "value_inputs": []})
        text = text.replace("{A}", _phrase(fa, rng, True)).replace("{B}", _phrase(fb, rng, True))
    elif family.startswith("query_"):
        attr = family[len("query_"):]
        f = _unique_filters(objects, rng.randrange(len(objects)), rng, exclude=attr)
        if f is None:
            return None
        last = _filters_program(f, program)
        program.append({"function": "unique", "inputs": [last], "value_inputs": []})
        program.append({"function": family, "inputs": [len(program) - 1], "value_inputs": []})
        text = text.replace("{X}", _phrase(f, rng, False))
    else:  # equal_<attr>: two objects described without the compared attribute
        attr = family[len("equal_"):]
        i = rng.randrange(len(objects))
        alike = [k for k, o in enumerate(objects) if k != i and o[attr] == objects[i][attr]]
        j = rng.choice(alike) if alike and rng.random() < 0.5 else rng.choice([k for k in range(len(objects)) if k != i])
        fx, fy = _unique_filters(objects, i, rng, exclude=attr), _unique_filters(objects, j, rng, exclude=attr)
        if fx is None or fy is None:
            return None
        x = _filters_program(fx, program)
        program.append({"function": "unique", "inputs": [x], "value_inputs": []})
        ux = len(program) - 1
        y = _filters_program(fy, program)
        program.append({"function": "unique", "inputs": [y], "value_inputs": []})
        uy = len(program) - 1
        program.append({"function": f"query_{attr}", "inputs": [ux], "value_inputs": []})
        qx = len(program) - 1
        program.append({"function": f"query_{attr}", "inputs": [uy], "value_inputs": []})
        program.append({"function": family, "inputs": [qx, len(program) - 1], "value_inputs": []})
        text = text.replace("{X}", _phrase(fx, rng, False)).replace("{Y}", _phrase(fy, rng, False))
    return {"question": text, "program": program, "answer": execute(program, scene),
            "question_family_index": family_index(family, template)}


def _questions_for(scene: dict[str, Any], families: Sequence[str], answer_counts: dict[str, dict[str, int]],
                   rng: random.Random, candidates: int, max_count: int) -> list[dict[str, Any]]:
    """One question per listed family: of `candidates` draws, the one whose answer the family has least so far."""
    out, seen = [], set()
    for family in families:
        best = None
        for _ in range(candidates):
            q = make_question(family, scene, rng, max_count)
            if q is None or q["question"] in seen:
                continue
            if best is None or answer_counts[family].get(q["answer"], 0) < answer_counts[family].get(best["answer"], 0):
                best = q
        if best is not None:
            seen.add(best["question"])
            answer_counts[family][best["answer"]] = answer_counts[family].get(best["answer"], 0) + 1
            out.append(best)
    return out


# ----------------------------------------------------------------------------- the data set

SPLITS = ("train", "val", "test")
INFO = {"version": "1.0", "license": "Creative Commons Attribution (CC BY 4.0)",
        "date": "generated", "generator": "accuvqa.data.scenes"}


def mix_cycle(weights: Mapping[str, int]) -> list[str]:
    """Families in the order questions are asked: each family `weights[f]` times per cycle (1 where unnamed),
    interleaved round-robin so that consecutive questions differ."""
    w = {f: int(weights.get(f, 1)) for f in FAMILIES}
    if min(w.values()) < 1 or set(weights) - set(FAMILIES):
        raise DataError(f"family mix {dict(weights)}: give each of {', '.join(FAMILIES)} a weight of at least 1")
    return [f for r in range(max(w.values())) for f in FAMILIES if w[f] > r]


def generate(root: str | Path, n_images: dict[str, int], seed: int, image_size: int = 128,
             questions_per_image: int = QUESTIONS_PER_IMAGE, min_objects: int = 3, max_objects: int = 10,
             max_occlusion: float = 0.2, candidates: int = 12, max_count: int = MAX_COUNT,
             train_mix: Mapping[str, int] = TRAIN_MIX, features: bool = True,
             progress: Callable[[Iterable, str], Iterable] = lambda x, d: x) -> dict[str, Any]:
    """Write the reasoning set under `root` (CLEVR v1.0's layout, plus object features); a summary per split.

    Each image gets `questions_per_image` questions (fewer where a family's draws all fail); train's families
    follow `train_mix` (weights, see `mix_cycle`), val's and test's are uniform. Sets that count, equal_integer,
    less_than and greater_than questions count hold at most `max_count` objects. Deterministic from `seed`:
    the same arguments write the same bytes.
    """
    if min_objects < 2 or max_objects < min_objects:
        raise DataError(f"objects per image {min_objects}..{max_objects}: need 2 <= min_objects <= max_objects")
    unknown = set(n_images) - set(SPLITS)
    if unknown:
        raise DataError(f"unknown split(s) {sorted(unknown)}; the splits are {', '.join(SPLITS)}")
    root = Path(root)
    summary: dict[str, Any] = {}
    for split_no, split in enumerate(s for s in SPLITS if s in n_images):
        split_seed = int.from_bytes(hashlib.sha256(f"{seed}/{split}".encode()).digest()[:8], "little")
        rng = np.random.default_rng(split_seed)
        qrng = random.Random(split_seed)
        answer_counts: dict[str, dict[str, int]] = {f: {} for f in FAMILIES}
        scenes, questions = [], []
        image_dir = root / "images" / split
        feat_dir = root / "feats" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        for image_index in progress(range(n_images[split]), f"scenes {split}"):
            objects, rgb, x, boxes = sample_scene(rng, image_size, min_objects, max_objects, max_occlusion)
            scene = scene_json(objects, split, image_index, image_size)
            scenes.append(scene)
            _write_png(image_dir / scene["image_filename"], rgb)
            if features:
                write_features(feat_dir / f"{image_index}.npz", x, boxes, image_size)
            cycle = mix_cycle(train_mix if split == "train" else {})
            order = [cycle[(image_index * questions_per_image + k) % len(cycle)] for k in range(questions_per_image)]
            for q in _questions_for(scene, order, answer_counts, qrng, candidates, max_count):
                questions.append({"image_index": image_index, "image_filename": scene["image_filename"],
                                  "question": q["question"], "answer": q["answer"],
                                  "question_family_index": q["question_family_index"], "program": q["program"],
                                  "split": split, "question_index": len(questions)})
        info = {**INFO, "split": split, "seed": seed, "image_size": image_size}
        write_json_atomic(root / "questions" / f"CLEVR_{split}_questions.json", {"info": info, "questions": questions})
        write_json_atomic(root / "scenes" / f"CLEVR_{split}_scenes.json", {"info": info, "scenes": scenes})
        summary[split] = {"images": len(scenes), "questions": len(questions),
                          "majority_baseline": majority_baseline(questions)}
    return summary


def write_features(path: Path, x: np.ndarray, boxes: np.ndarray, image_size: int) -> None:
    """One image's features in the layout accuvqa reads: x (D, N), bbox (N, 4), image_w, image_h, num_bbox."""
    buf = io.BytesIO()
    np.savez(buf, x=x, bbox=boxes, image_w=image_size, image_h=image_size, num_bbox=x.shape[1])
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def majority_baseline(questions: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per family: the share (percent) of its most common answer, what answering without looking scores."""
    by_family: dict[str, dict[str, int]] = {}
    for q in questions:
        counts = by_family.setdefault(family_of(q["program"]), {})
        counts[q["answer"]] = counts.get(q["answer"], 0) + 1
    return {f: round(100.0 * max(c.values()) / sum(c.values()), 2) for f, c in sorted(by_family.items())}


def load_split(root: str | Path, split: str) -> tuple[list[dict], list[dict]]:
    """(questions, scenes) of one generated split; DataError when its files are missing or malformed."""
    out = []
    for kind in ("questions", "scenes"):
        path = Path(root) / kind / f"CLEVR_{split}_{kind}.json"
        try:
            out.append(json.loads(path.read_text())[kind])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read {path}: {e}; write it with accuvqa prepare") from e
    return out[0], out[1]
