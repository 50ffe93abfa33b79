"""A small synthetic CLEVR tree in the exact layout openvqa reads (`openvqa/core/path_cfgs.py`,
`openvqa/datasets/clevr/clevr_loader.py`, `data/clevr/clevr_extract_feat.py`):

  <root>/raw/questions/CLEVR_{train,val,test}_questions.json   CLEVR's schema; test without answer nor program
  <root>/raw/images/{train,val,test}/CLEVR_<split>_<6-digit index>.png   (with `images`)
  <root>/feats/{train,val,test}/<image_index>.npz   `x` (regions, feat_size) as openvqa writes it (with `features`)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")


def _step(function: str, inputs: list[int], value: str | None = None) -> dict:
    return {"function": function, "inputs": inputs, "value_inputs": [value] if value else []}


ANSWER_COLORS = COLORS[:3]  # the colours query_color answers (so a few train images hold every answer)


def _question(template: int, rng: np.random.Generator, cycle: int | None) -> tuple[str, str, list[dict], int]:
    """(question, answer, program, question_family_index) of one of five CLEVR families; with `cycle`, the answer
    is the cycle-th of its family's answers (so train covers them all), else drawn."""
    color, other = (str(c) for c in rng.choice(COLORS, 2, replace=False))
    pick = (lambda options: options[cycle % len(options)]) if cycle is not None else (
        lambda options: str(rng.choice(options)))
    yes_no = pick(["yes", "no"])
    scene = [_step("scene", [])]
    if template == 0:
        return (f"How many {color} things are there?", pick(["0", "1", "2", "3"]),
                scene + [_step("filter_color", [0], color), _step("count", [1])], 0)
    if template == 1:
        return (f"Are there any {color} spheres?", yes_no,
                scene + [_step("filter_color", [0], color), _step("filter_shape", [1], "sphere"), _step("exist", [2])], 1)
    if template == 2:
        return (f"What color is the large cube behind the {color} cylinder?", pick(list(ANSWER_COLORS)),
                scene + [_step("filter_color", [0], color), _step("filter_shape", [1], "cylinder"),
                         _step("unique", [2]), _step("relate", [3], "behind"), _step("filter_size", [4], "large"),
                         _step("filter_shape", [5], "cube"), _step("unique", [6]), _step("query_color", [7])], 2)
    if template == 3:
        return (f"Is the {color} cube the same size as the {other} sphere?", yes_no,
                scene + [_step("filter_color", [0], color), _step("filter_shape", [1], "cube"), _step("unique", [2]),
                         _step("scene", []), _step("filter_color", [4], other), _step("filter_shape", [5], "sphere"),
                         _step("unique", [6]), _step("query_size", [3]), _step("query_size", [7]),
                         _step("equal_size", [8, 9])], 3)
    return (f"Are there more {color} things than {other} rubber cylinders?", yes_no,
            scene + [_step("filter_color", [0], color), _step("count", [1]), _step("scene", []),
                     _step("filter_color", [3], other), _step("filter_material", [4], "rubber"),
                     _step("filter_shape", [5], "cylinder"), _step("count", [6]), _step("greater_than", [2, 7])], 4)


def write_clevr_tree(root: Path, feat_size: int = 8, regions: int = 4, images_per_split: int = 4,
                     questions_per_image: int = 5, seed: int = 0, features: bool = True, images: bool = False,
                     image_size: tuple[int, int] = (48, 32)) -> dict:
    """Write the tree (see the module docstring); returns its paths and each split's questions as written."""
    rng = np.random.default_rng(seed)
    raw, feats = Path(root) / "raw", Path(root) / "feats"
    (raw / "questions").mkdir(parents=True)
    written = {}
    for split in ("train", "val", "test"):
        questions = []
        for image_index in range(images_per_split):
            filename = f"CLEVR_{split}_{image_index:06d}.png"
            if features:
                (feats / split).mkdir(parents=True, exist_ok=True)
                x = rng.normal(size=(regions, feat_size)).astype(np.float32)  # (196, 1024) in openvqa's files
                np.savez(feats / split / f"{image_index}.npz", x=x)
            if images:
                (raw / "images" / split).mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (image_size[1], image_size[0], 4), dtype=np.uint8)
                pixels[..., 3] = 255  # CLEVR's PNGs are RGBA, fully opaque
                Image.fromarray(pixels, "RGBA").save(raw / "images" / split / filename)
            for k in range(questions_per_image):
                # train: every family on every image, so the answer dictionary sees each answer early
                template = k % 5 if split == "train" else int(rng.integers(0, 5))
                text, answer, program, family = _question(template, rng, image_index if split == "train" else None)
                question = {"image_index": image_index, "split": split, "image_filename": filename,
                            "question_index": len(questions), "question": text}
                if split != "test":  # CLEVR's test questions come without answer, program and family
                    question.update(answer=answer, question_family_index=family, program=program)
                questions.append(question)
        data = {"info": {"split": split, "license": "Creative Commons Attribution (CC BY 4.0)", "version": "1.0",
                         "date": "2/14/2017"}, "questions": questions}
        (raw / "questions" / f"CLEVR_{split}_questions.json").write_text(json.dumps(data))
        written[split] = questions
    return {"DATASET_PATH": str(raw), "FEATURE_PATH": str(feats), "questions": written}
