"""Attention pictures: where a model looked over the image's regions and the question's words.

A model exposes attention when it has two methods (MCAN does; see docs/models.md):
`keep_attention(on)` (attention computed explicitly and its maps kept, same output) and
`attention_maps()` (those maps, by name, from the last forward pass). The region attention drawn
on the image is `image_flat`: the AttFlat weights that pool the regions into the vector the answer
classifier reads (the mean over glimpses when FLAT_GLIMPSES > 1). An `Answer` holds one forward
pass's answers and maps (`accuvqa.predict` makes them).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from accuvqa.errors import ConfigError, DataError
from accuvqa.files import atomic_write

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

DPI = 100
SUMMARY_SIZE = (12.0, 4.5)  # inches: image | answers | question words; 1200 x 450 pixels at DPI
LAYER_ROW_HEIGHT = 2.1  # inches per row of per-head maps
MAX_TICK_LABELS = 16  # more regions than this: no per-region tick labels
# the per-layer maps `<prefix>/<i>`, in drawing order: (map name prefix, row label, query axis, key axis)
LAYER_KINDS = (("question_self", "SA {i}: words -> words", "question", "question"),
               ("image_question", "SGA {i}: regions -> words", "image", "question"),
               ("image_self", "SGA {i}: regions -> regions", "image", "image"))
REGION_ATTENTION_NOTE = ("region attention = AttFlat image weights that pool the regions for the answer "
                         "classifier (mean over glimpses)")


@dataclass
class Answer:
    """One forward pass: the top answers and, for a model that exposes attention, its maps.

    `region_weights` (N,): the AttFlat image weights that pool the regions for the classifier (mean
    over glimpses). `maps`: name -> array without the batch axis, cut to the question's words (T) and
    the image's regions (N): `question_self/<i>` (heads, T, T), `image_self/<i>` (heads, N, N),
    `image_question/<i>` (heads, N, T), `image_flat` (N, G), `question_flat` (T, G).
    """

    question: str
    answers: list[tuple[str, float]]  # (answer, sigmoid score), best first
    tokens: list[str]  # the words as the model saw them (UNK for words outside its dictionary)
    region_weights: np.ndarray | None = None
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: np.ndarray | None = None


def cut_maps(maps: dict[str, torch.Tensor], n_words: int, n_regions: int) -> dict[str, np.ndarray]:
    """A model's `attention_maps()` without the batch axis and the question's padding positions (queries and keys)."""
    sizes = {"question": n_words, "image": n_regions}
    axes = {prefix: (q_kind, k_kind) for prefix, _, q_kind, k_kind in LAYER_KINDS}
    cut = {}
    for name, m in maps.items():
        m = m[0].float().cpu().numpy()
        kind = name.split("/")[0]
        if kind in axes:
            q, k = axes[kind]
            cut[name] = m[:, :sizes[q], :sizes[k]]
        else:  # image_flat / question_flat: (L, G)
            cut[name] = m[:sizes[kind.split("_")[0]]]
    return cut


def exposes_attention(model: Any) -> bool:
    """Whether `model` can keep its attention maps (`keep_attention` and `attention_maps` methods)."""
    return callable(getattr(model, "keep_attention", None)) and callable(getattr(model, "attention_maps", None))


def require_attention(model: Any, model_name: str) -> None:
    """ConfigError unless the model exposes attention maps."""
    if not exposes_attention(model):
        raise ConfigError(f"model {model_name} does not expose attention maps (it needs keep_attention() "
                          f"and attention_maps(), see docs/models.md); --attention works with MODEL_USE mcan")


def read_image(path: str | Path) -> np.ndarray:
    """The --image-file as (H, W, 3) uint8; DataError naming --image-file when missing or unreadable."""
    from accuvqa.data.easyvqa import read_rgb

    try:
        return read_rgb(path)
    except DataError as e:
        raise DataError(f"--image-file: {e}") from e


def check_picture_path(out: str | Path) -> None:
    """ConfigError / DataError unless `out` names a .png file in an existing folder."""
    if Path(out).suffix.lower() != ".png":
        raise ConfigError(f"--attention {out}: the picture is a PNG file, name it OUT.png")
    if not Path(out).parent.is_dir():
        raise DataError(f"--attention {out}: folder {Path(out).parent} does not exist")


def region_heat(boxes: np.ndarray, weights: np.ndarray, width: int, height: int) -> np.ndarray:
    """(height, width) map: at each pixel, the summed weight of the regions whose box covers it."""
    heat = np.zeros((height, width), dtype=np.float64)
    for (x1, y1, x2, y2), weight in zip(boxes, weights):
        c1, r1 = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
        c2, r2 = min(int(np.ceil(x2)), width), min(int(np.ceil(y2)), height)
        if c2 > c1 and r2 > r1:
            heat[r1:r2, c1:c2] += weight
    return heat


def picture_and_boxes(answer: Answer, image_file: str | Path | None, boxes: np.ndarray | None,
                     image_size: tuple[int, int] | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The picture to draw on (the image, or a blank canvas) and the boxes in its pixels."""
    boxes = answer.boxes if boxes is None else boxes
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) != len(answer.region_weights):
            raise DataError(f"{len(boxes)} region boxes for {len(answer.region_weights)} regions of features")
    if image_file is not None:
        rgb = read_image(image_file)
        if boxes is not None and image_size is not None:  # boxes are in the stored image size's pixels
            boxes = boxes * np.array([rgb.shape[1] / image_size[0], rgb.shape[0] / image_size[1]] * 2)
        return rgb, boxes
    if boxes is None:
        return None, None
    if image_size is None:
        image_size = (max(int(np.ceil(boxes[:, 2].max())), 1), max(int(np.ceil(boxes[:, 3].max())), 1))
    return np.full((int(image_size[1]), int(image_size[0]), 3), 255, dtype=np.uint8), boxes


def _draw_regions(ax: Any, rgb: np.ndarray | None, boxes: np.ndarray | None, weights: np.ndarray,
                  blank: bool) -> None:
    from matplotlib.patches import Rectangle

    if rgb is None:  # no boxes known: the weights per region as bars
        ax.bar(range(len(weights)), weights, color="tab:orange")
        ax.set(xlabel="region", ylabel="weight", title="attention over regions (no boxes known)")
        return
    height, width = rgb.shape[:2]
    heat = region_heat(boxes, weights, width, height)
    if heat.max() > 0:
        heat = heat / heat.max()
    shade = 0.3 + 0.7 * heat[..., None]  # unattended pixels dimmed, attended ones kept
    ax.imshow((rgb.astype(np.float64) * shade).astype(np.uint8), extent=(0, width, height, 0))
    ax.imshow(heat, cmap="inferno", alpha=0.35, extent=(0, width, height, 0), vmin=0, vmax=1)
    order = np.argsort(-weights)[:5]
    for rank, r in enumerate(order):
        x1, y1, x2, y2 = boxes[r]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=2.5 - 0.4 * rank,
                               edgecolor="tab:cyan" if rank == 0 else "white"))
        ax.text(x1 + 0.5, y1 + 0.5, f"r{r} {weights[r]:.2f}", fontsize=8, va="top", color="black",
                bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "linewidth": 0})
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("attention over regions" + ("\n(blank canvas: no --image-file)" if blank else ""), fontsize=10)


def _draw_answers(ax: Any, answers: list[tuple[str, float]]) -> None:
    names = [a for a, _ in answers][::-1]
    scores = [s for _, s in answers][::-1]
    ax.barh(range(len(names)), scores, color="tab:blue")
    ax.set_yticks(range(len(names)), names)
    for y, s in enumerate(scores):
        ax.text(min(s, 1.0) + 0.01, y, f"{s:.4f}", va="center", fontsize=9)
    ax.set(xlim=(0, 1.2), xlabel="score (sigmoid)")
    ax.set_title(f"top {len(answers)} answers", fontsize=10)


def _draw_words(ax: Any, tokens: list[str], weights: np.ndarray) -> None:
    ax.barh(range(len(tokens)), weights, color="tab:green")
    ax.set_yticks(range(len(tokens)), tokens)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="weight")
    ax.set_title("attention over question words", fontsize=10)


def _axis_labels(kind: str, tokens: list[str], n_regions: int) -> list[str]:
    if kind == "question":
        return tokens
    return [f"r{r}" for r in range(n_regions)] if n_regions <= MAX_TICK_LABELS else []


def _draw_layers(fig: Any, grid: Any, answer: Answer) -> None:
    """One row per (kind, layer), one column per head; words and regions label the axes."""
    n_regions = len(answer.region_weights)
    rows = [(name.format(i=i), f"{prefix}/{i}", q_kind, k_kind)
            for prefix, name, q_kind, k_kind in LAYER_KINDS for i in range(1, _n_layers(answer, prefix) + 1)]
    heads = answer.maps[rows[0][1]].shape[0]
    from matplotlib.colors import PowerNorm

    scale = PowerNorm(0.5, vmin=0, vmax=1)  # one scale for every map; square root so small weights show
    height = fig.get_figheight()
    cells = grid.subgridspec(len(rows), heads, hspace=1.0, wspace=0.35)
    for row, (label, key, q_kind, k_kind) in enumerate(rows):
        for head in range(heads):
            ax = fig.add_subplot(cells[row, head])
            if head == 0:
                box = ax.get_position()
                fig.text(box.x0 - 0.6 / fig.get_figwidth(), box.y1 + 0.3 / height, label, fontsize=9,
                         fontweight="bold")
            image = ax.imshow(answer.maps[key][head], cmap="viridis", norm=scale, aspect="auto",
                              interpolation="nearest")
            q_labels = _axis_labels(q_kind, answer.tokens, n_regions)
            k_labels = _axis_labels(k_kind, answer.tokens, n_regions)
            ax.set_xticks(range(len(k_labels)), k_labels, rotation=90, fontsize=6)
            ax.set_yticks(range(len(q_labels)), q_labels if head == 0 else [""] * len(q_labels), fontsize=6)
            ax.set_title(f"head {head + 1}", fontsize=7)
    fig.colorbar(image, ax=fig.axes[-heads * len(rows):], fraction=0.02, pad=0.02, label="attention weight")


def _n_layers(answer: Answer, prefix: str) -> int:
    return sum(1 for key in answer.maps if key.startswith(prefix + "/"))


def draw_attention(answer: Answer, out: str | Path | None = None, *, image_file: str | Path | None = None,
                   boxes: np.ndarray | None = None, image_size: tuple[int, int] | None = None,
                   layers: bool = False) -> Image:
    """The attention picture of one answer (image with region attention, question, top answers, and with
    `layers` the per-layer, per-head maps) as a PIL image, also written to `out` (PNG) when given.

    Boxes are (N, 4) x1, y1, x2, y2 in pixels of an image of `image_size` (width, height); they are
    scaled onto `image_file` when its size differs. Without an image file, a blank canvas of
    `image_size` is drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    if answer.region_weights is None:
        raise ConfigError("this answer holds no attention maps: ask with answer(..., attention=True) "
                          "a model that exposes them")
    if out is not None:
        check_picture_path(out)
    rgb, boxes = picture_and_boxes(answer, image_file, boxes, image_size)
    layer_rows = sum(_n_layers(answer, prefix) for prefix, *_ in LAYER_KINDS) if layers else 0
    heads = answer.maps[f"{LAYER_KINDS[0][0]}/1"].shape[0] if layers else 0
    width = max(SUMMARY_SIZE[0], 1.9 * heads)
    height = SUMMARY_SIZE[1] + LAYER_ROW_HEIGHT * layer_rows
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    try:
        # the summary row keeps its place in inches from the top; the per-head maps go below it
        top = fig.add_gridspec(1, 3, width_ratios=[1.1, 1, 0.8], wspace=0.45, top=1 - 0.75 / height,
                               bottom=1 - (SUMMARY_SIZE[1] - 0.85) / height)
        _draw_regions(fig.add_subplot(top[0]), rgb, boxes, answer.region_weights, blank=image_file is None)
        _draw_answers(fig.add_subplot(top[1]), answer.answers)
        _draw_words(fig.add_subplot(top[2]), answer.tokens, answer.maps["question_flat"].mean(axis=1))
        if layers:
            _draw_layers(fig, fig.add_gridspec(1, 1, top=1 - (SUMMARY_SIZE[1] + 0.5) / height,
                                               bottom=0.8 / height)[0], answer)
        fig.suptitle(f"Q: {answer.question}", fontsize=13, y=1 - 0.2 / height)
        fig.text(0.01, 0.1 / height, REGION_ATTENTION_NOTE, fontsize=8, color="dimgray")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    png = buffer.getvalue()
    if out is not None:
        atomic_write(out, lambda f: f.write(png))
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return image.copy()
