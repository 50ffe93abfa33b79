"""The bundled easy-VQA dataset (PyPI `easy-vqa`, MIT), written in the VQA v2 layout.

Each 64x64 image holds one shape on a pale background. Its features are a grid of patch features
computed from the pixels: 4 cells of 32x32 pixels plus one region for the whole object, each a
row of FEAT_SIZE numbers (see `image_features`). Train images are split by image into train2014
(training) and val2014 (per-epoch validation, VAL_FRACTION of the images); easy-VQA's test split
becomes test2015, with annotations so that `accuvqa test` reports its accuracy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from accuvqa.config import Config
from accuvqa.data.features import feature_file
from accuvqa.data.records import FOLDERS, annotation_file, question_file
from accuvqa.errors import DataError
from accuvqa.files import write_json_atomic

log = logging.getLogger(__name__)

GRID = 2  # 2 x 2 cells of 32 x 32 pixels
MASK_GRID = 4  # object mask sampled 4 x 4 inside its bounding box
FEAT_SIZE = 32
N_REGIONS = 1 + GRID * GRID
_BG_THRESHOLD = 40  # max channel difference from the background colour that still counts as background


def image_features(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features `x` (FEAT_SIZE, N_REGIONS), stored (D, N) as VQA v2, and region boxes (N, 4) in pixels.

    Row layout of each region (D = 32):
      0-2   mean colour of the object pixels inside the region (0..1; zeros if none)
      3-6   region box x0, y0, x1, y1 (0..1)
      7     object fraction of the region
      8     object fill ratio of its own bounding box (circle ~.79, rectangle 1, triangle ~.5)
      9     bounding-box aspect ratio, width / (width + height)
      10-25 object occupancy on a 4x4 grid inside its bounding box (the shape's silhouette)
      26-27 region kind one-hot: whole object, grid cell
      28-31 object centroid x, y and spread x, y (normalised second moments)
    Grid-cell rows fill 0-7 and 27; the object row fills all. No row is all zero.
    """
    img = rgb.astype(np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    mask = np.abs(img - background).max(axis=2) > _BG_THRESHOLD  # (H, W) object pixels
    rows = np.zeros((N_REGIONS, FEAT_SIZE), dtype=np.float32)

    def colour(region_mask: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        return pixels[region_mask].mean(axis=0) / 255.0 if region_mask.any() else np.zeros(3)

    ys, xs = np.nonzero(mask)
    obj = rows[0]
    if len(xs):
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        box_mask = mask[y0:y1, x0:x1]
        obj[0:3] = colour(mask, img)
        obj[3:7] = (x0 / w, y0 / h, x1 / w, y1 / h)
        obj[7] = mask.mean()
        obj[8] = box_mask.mean()
        obj[9] = (x1 - x0) / ((x1 - x0) + (y1 - y0))
        cy = np.linspace(0, box_mask.shape[0], MASK_GRID + 1).astype(int)
        cx = np.linspace(0, box_mask.shape[1], MASK_GRID + 1).astype(int)
        occupancy = [box_mask[cy[i]:max(cy[i + 1], cy[i] + 1), cx[j]:max(cx[j + 1], cx[j] + 1)].mean()
                     for i in range(MASK_GRID) for j in range(MASK_GRID)]
        obj[10:26] = occupancy
        obj[28:32] = (xs.mean() / w, ys.mean() / h, xs.std() / w * 2, ys.std() / h * 2)
    obj[26] = 1.0
    cell_h, cell_w = h // GRID, w // GRID
    for i in range(GRID):
        for j in range(GRID):
            cell = rows[1 + i * GRID + j]
            sl = (slice(i * cell_h, (i + 1) * cell_h), slice(j * cell_w, (j + 1) * cell_w))
            cell[0:3] = colour(mask[sl], img[sl])
            cell[3:7] = (j / GRID, i / GRID, (j + 1) / GRID, (i + 1) / GRID)
            cell[7] = mask[sl].mean()
            cell[27] = 1.0
    boxes = rows[:, 3:7] * np.array([w, h, w, h], dtype=np.float32)
    return rows.T.copy(), boxes


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as an (H, W, 3) uint8 array; DataError when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise DataError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def image_file_features(path: str | Path) -> np.ndarray:
    """Region features (N_REGIONS, FEAT_SIZE) of one image file, as `prepare` stores them (transposed)."""
    return image_features(read_rgb(path))[0].T


def _load_easy_vqa():
    try:
        import easy_vqa
    except ImportError:
        raise DataError(
            "the bundled dataset needs the easy-vqa package: pip install easy-vqa "
            "(make demo installs it)"
        ) from None
    return easy_vqa


def _annotation(qid: int, image_id: int, question: str, answer: str) -> dict:
    answer_type = "yes/no" if answer in ("yes", "no") else "other"
    return {
        "question_id": qid, "image_id": image_id, "question_type": _question_type(question),
        "answer_type": answer_type, "multiple_choice_answer": answer,
        # easy-VQA has one answer per question: ten identical annotators keep the formula unchanged.
        "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)],
    }


def _question_type(question: str) -> str:
    words = question.lower().rstrip("?").split()
    return " ".join(words[:3]) if words else ""


def prepare_easyvqa(cfg: Config, progress: Callable[[Sequence, str], Sequence] = lambda x, d: x,
                    max_images: int | None = None) -> dict:
    """Write easy-VQA as VQA v2 JSON + one .npz per image under DATASET_PATH / FEATURE_PATH.

    `max_images` keeps only the first images of each easy-VQA split (a small slice for tests).
    """
    easy_vqa = _load_easy_vqa()
    rng = np.random.default_rng(cfg.SEED)
    train_q, train_a, train_img = easy_vqa.get_train_questions()
    test_q, test_a, test_img = easy_vqa.get_test_questions()
    train_ids = sorted(easy_vqa.get_train_image_paths())[:max_images]
    test_ids = set(sorted(easy_vqa.get_test_image_paths())[:max_images])
    test_q, test_a, test_img = _keep(test_q, test_a, test_img, test_ids)
    train_q, train_a, train_img = _keep(train_q, train_a, train_img, set(train_ids))
    n_val = max(1, int(round(len(train_ids) * cfg.VAL_FRACTION)))
    val_ids = set(rng.permutation(train_ids)[:n_val].tolist())

    splits = {  # split -> (questions, answers, image ids, image paths)
        "train": ([], [], [], easy_vqa.get_train_image_paths()),
        "val": ([], [], [], easy_vqa.get_train_image_paths()),
        "test": (test_q, test_a, test_img, easy_vqa.get_test_image_paths()),
    }
    for q, a, i in zip(train_q, train_a, train_img):
        part = splits["val" if i in val_ids else "train"]
        part[0].append(q), part[1].append(a), part[2].append(i)

    dataset_path = Path(cfg.DATASET_PATH)
    dataset_path.mkdir(parents=True, exist_ok=True)
    summary = {}
    qid_base = {"train": 0, "val": 1_000_000, "test": 2_000_000}
    for split, (questions, answers, image_ids, paths) in splits.items():
        folder = FOLDERS[split]
        qids = [qid_base[split] + k for k in range(len(questions))]
        qjson = {"questions": [{"question_id": qid, "image_id": int(i), "question": q}
                               for qid, q, i in zip(qids, questions, image_ids)]}
        ajson = {"annotations": [_annotation(qid, int(i), q, a)
                                 for qid, q, a, i in zip(qids, questions, answers, image_ids)]}
        write_json_atomic(question_file(dataset_path, split), qjson)
        write_json_atomic(annotation_file(dataset_path, split), ajson)
        out_dir = Path(cfg.FEATURE_PATH) / folder
        out_dir.mkdir(parents=True, exist_ok=True)
        images = sorted(set(int(i) for i in image_ids))
        for image_id in progress(images, f"features {folder}"):
            rgb = read_rgb(paths[image_id])
            x, boxes = image_features(rgb)
            target = feature_file(cfg.FEATURE_PATH, folder, image_id)
            tmp = target.with_suffix(".tmp.npz")
            np.savez(tmp, x=x, bbox=boxes, image_w=rgb.shape[1],
                     image_h=rgb.shape[0], num_bbox=x.shape[1])
            tmp.replace(target)
        summary[split] = {"questions": len(questions), "images": len(images)}
    return summary


def _keep(questions: list, answers: list, image_ids: list, keep: set) -> tuple[list, list, list]:
    rows = [(q, a, i) for q, a, i in zip(questions, answers, image_ids) if i in keep]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

