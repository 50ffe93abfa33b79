"""A small synthetic GQA tree in openvqa's exact layout (`openvqa/core/path_cfgs.py`), for the GQA tests.

```
<root>/gqa/raw/questions1.2/{train,val,testdev}_balanced_questions.json, submission_all_questions.json
<root>/gqa/raw/eval/val_choices.json (openvqa's), testdev_choices.json (so the val split's validity is scored)
<root>/gqa/feats/gqa-frcn/<imageId>.npz   x (N, D), bbox (N, 4), width, height  (gqa_feat_preproc.py's keys)
<root>/gqa/feats/gqa-grid/<imageId>.npz   x (49, D)
```
Image ids are GQA's two forms ("2354786", "n161313"); question ids are strings of digits, some with a
leading zero. Questions carry every field GQA's scoring reads (types, groups, semantic program, isBalanced).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# (question, answer, structural type, semantic type, detailed type, global group, semantic program)
QA = [
    ("Is the cat black?", "yes", "verify", "attr", "verifyAttr", None,
     [{"operation": "select", "argument": "cat (1)", "dependencies": []},
      {"operation": "verify color", "argument": "black", "dependencies": [0]}]),
    ("What color is the table-top?", "brown", "query", "attr", "queryAttr", "color",
     [{"operation": "select", "argument": "table (2)", "dependencies": []},
      {"operation": "query", "argument": "color", "dependencies": [0]}]),
    ("Which animal is on the sofa, the dog or the cat?", "dog", "choose", "rel", "chooseRel", None,
     [{"operation": "select", "argument": "sofa (3)", "dependencies": []},
      {"operation": "relate", "argument": "animal,on,s (4)", "dependencies": [0]},
      {"operation": "choose name", "argument": "dog|cat", "dependencies": [1]}]),
    ("Are there both cups and plates?", "no", "logical", "obj", "existAnd", None,
     [{"operation": "select", "argument": "cup (5)", "dependencies": []},
      {"operation": "exist", "argument": "?", "dependencies": [0]},
      {"operation": "select", "argument": "plate (6)", "dependencies": []},
      {"operation": "exist", "argument": "?", "dependencies": [2]},
      {"operation": "and", "argument": "", "dependencies": [1, 3]}]),
    ("What is the man wearing?", "t-shirt", "query", "rel", "relS", "clothing",
     [{"operation": "select", "argument": "man (7)", "dependencies": []},
      {"operation": "relate", "argument": "_,wearing,o (8)", "dependencies": [0]},
      {"operation": "query", "argument": "name", "dependencies": [1]}]),
    ("Who is wearing the hat?", "woman", "query", "rel", "relS", "person",
     [{"operation": "select", "argument": "hat (9)", "dependencies": []},
      {"operation": "relate", "argument": "_,wearing,s (10)", "dependencies": [0]},
      {"operation": "query", "argument": "name", "dependencies": [1]}]),
]
# GQA's split -> (question file, image id prefix or None for numeric ids)
SPLITS = {"train": "train_balanced_questions.json", "val": "val_balanced_questions.json",
          "testdev": "testdev_balanced_questions.json", "submission": "submission_all_questions.json"}
GRID = 49


def image_ids(split: str, n: int) -> list[str]:
    """GQA's imageIds: Visual Genome numbers for train and val, "n" + digits for testdev and submission."""
    if split in ("train", "val"):
        return [str(2354786 + 100 * SPLITS.__len__() * i + list(SPLITS).index(split)) for i in range(n)]
    return [f"n{161313 + 10 * i + list(SPLITS).index(split)}" for i in range(n)]


def question(qa: tuple, image: str, with_answer: bool) -> dict:
    """One question in GQA's balanced-questions format."""
    text, answer, structural, semantic, detailed, group, program = qa
    q = {"imageId": image, "question": text, "isBalanced": True, "entailed": [], "equivalent": [],
         "groups": {"global": group, "local": f"10q-{semantic}"}, "semantic": program, "semanticStr": "",
         "types": {"structural": structural, "semantic": semantic, "detailed": detailed}, "annotations": {}}
    if with_answer:
        q.update(answer=answer, fullAnswer=f"The answer is {answer}.")
    return q


def write_gqa_tree(root: Path, feat_size: int = 12, images: int = 6, seed: int = 0) -> dict:
    """Write the tree under `root/gqa`; returns DATASET_PATH, FEATURE_PATH, IMG_FEAT_SIZE, the questions by split."""
    rng = np.random.default_rng(seed)
    questions_dir, feats = root / "gqa" / "raw" / "questions1.2", root / "gqa" / "feats"
    for folder in (questions_dir, root / "gqa" / "raw" / "eval", feats / "gqa-frcn", feats / "gqa-grid"):
        folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict] = {}
    qid = 0
    for split, file in SPLITS.items():
        questions = {}
        for image in image_ids(split, images):
            n_regions = int(rng.integers(3, 10))
            width, height = int(rng.integers(300, 640)), int(rng.integers(200, 480))
            corners = rng.uniform(0, 0.5, size=(n_regions, 2)) * [width, height]
            bbox = np.hstack([corners, corners + rng.uniform(0.1, 0.5, size=(n_regions, 2)) * [width, height]])
            np.savez(feats / "gqa-frcn" / f"{image}.npz", x=rng.normal(size=(n_regions, feat_size)).astype(np.float32),
                     bbox=bbox.astype(np.float32), width=width, height=height)
            np.savez(feats / "gqa-grid" / f"{image}.npz", x=rng.normal(size=(GRID, feat_size)).astype(np.float32))
            for qa in QA:
                qid += 1
                questions[f"{qid:08d}" if qid % 2 else str(20000000 + qid)] = question(qa, image, split != "submission")
        (questions_dir / file).write_text(json.dumps(questions))
        written[split] = questions
    for split in ("val", "testdev"):  # valid: the question's own answer and one other; plausible: every answer
        answers = sorted({qa[1] for qa in QA})
        choices = {q: {"valid": [v["answer"], "yes" if v["answer"] != "yes" else "no"], "plausible": answers}
                   for q, v in written[split].items()}
        (root / "gqa" / "raw" / "eval" / f"{split}_choices.json").write_text(json.dumps(choices))
    return {"DATASET_PATH": str(questions_dir), "FEATURE_PATH": str(feats), "IMG_FEAT_SIZE": feat_size,
            "questions": written}
