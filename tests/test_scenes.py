"""The bundled CLEVR-style reasoning set: deterministic files, CLEVR's schema, programs that give the stored
answers, and attributes that the pixels' features give back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from accuvqa.data import scenes
from accuvqa.errors import DataError


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, dict]:
    """A small generated set, shared by the tests that only read it; its train split asks the families alike (the
    default mix asks count once in 33 questions, too rarely for 260 questions to show its balance)."""
    root = tmp_path_factory.mktemp("reasoning")
    summary = scenes.generate(root, {"train": 26, "test": 2}, seed=3, image_size=128, questions_per_image=10,
                              train_mix={})
    return root, summary


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 7), (b, 7), (c, 8)):
        scenes.generate(root, {"train": 3, "val": 2}, seed=seed, image_size=96, questions_per_image=6,
                        max_objects=6)
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert set(da) >= {"images/train/CLEVR_train_000000.png", "images/val/CLEVR_val_000001.png",
                       "questions/CLEVR_train_questions.json", "scenes/CLEVR_val_scenes.json", "feats/train/2.npz"}
    assert da == db
    assert set(da) == set(dc) and all(da[k] != dc[k] for k in da if k.endswith(".png"))


def test_files_follow_clevrs_schema(sample):
    root, _ = sample
    qfile = json.loads((root / "questions" / "CLEVR_train_questions.json").read_text())
    sfile = json.loads((root / "scenes" / "CLEVR_train_scenes.json").read_text())
    assert qfile["info"]["split"] == "train" and sfile["info"]["split"] == "train"
    for k, q in enumerate(qfile["questions"]):
        assert set(q) == {"image_index", "image_filename", "question", "answer", "question_family_index",
                          "program", "split", "question_index"}
        assert q["question_index"] == k and q["split"] == "train"
        assert q["image_filename"] == f"CLEVR_train_{q['image_index']:06d}.png"
        assert (root / "images" / "train" / q["image_filename"]).is_file()
        for i, node in enumerate(q["program"]):
            assert set(node) == {"function", "inputs", "value_inputs"}
            assert all(0 <= j < i for j in node["inputs"])
        assert q["program"][0]["function"] == "scene"
    for i, s in enumerate(sfile["scenes"]):
        assert s["image_index"] == i and s["image_filename"] == f"CLEVR_train_{i:06d}.png"
        assert 3 <= len(s["objects"]) <= 10
        assert set(s["relationships"]) == {"left", "right", "front", "behind"}
        for o in s["objects"]:
            assert o["color"] in scenes.COLORS and o["shape"] in scenes.SHAPES
            assert o["size"] in scenes.SIZES and o["material"] in scenes.MATERIALS
            assert len(o["3d_coords"]) == 3 and len(o["pixel_coords"]) == 3
        with np.load(root / "feats" / "train" / f"{i}.npz") as z:
            n = len(s["objects"]) + 1  # and the floor
            assert z["x"].shape == (scenes.FEAT_SIZE, n) and not (z["x"] == 0).all(axis=0).any()
            assert z["bbox"].shape == (n, 4) and int(z["num_bbox"]) == n
            assert int(z["image_w"]) == int(z["image_h"]) == 128


def test_every_program_gives_the_stored_answer(sample):
    root, _ = sample
    questions, scene_list = scenes.load_split(root, "train")
    assert questions
    for q in questions:
        assert scenes.execute(q["program"], scene_list[q["image_index"]]) == q["answer"]


def _hand_scene() -> dict:
    objects = [  # x grows to the right, y towards the camera
        {"color": "red", "shape": "cube", "size": "large", "material": "metal", "pixel_coords": [10, 50, 0]},
        {"color": "red", "shape": "sphere", "size": "small", "material": "rubber", "pixel_coords": [40, 20, 0]},
        {"color": "blue", "shape": "cylinder", "size": "small", "material": "metal", "pixel_coords": [70, 80, 0]},
    ]
    xs, ys = [10, 40, 70], [50, 20, 80]
    rel = {"left": [[j for j in range(3) if xs[j] < xs[i]] for i in range(3)],
           "right": [[j for j in range(3) if xs[j] > xs[i]] for i in range(3)],
           "front": [[j for j in range(3) if ys[j] > ys[i]] for i in range(3)],
           "behind": [[j for j in range(3) if ys[j] < ys[i]] for i in range(3)]}
    return {"objects": objects, "relationships": rel}


def _node(function: str, inputs=(), values=()) -> dict:
    return {"function": function, "inputs": list(inputs), "value_inputs": list(values)}


def test_executor_on_a_hand_made_scene():
    scene = _hand_scene()
    red = [_node("scene"), _node("filter_color", [0], ["red"])]
    assert scenes.execute(red + [_node("count", [1])], scene) == "2"
    assert scenes.execute(red + [_node("filter_shape", [1], ["cylinder"]), _node("exist", [2])], scene) == "no"
    metal_count = [_node("scene"), _node("filter_material", [0], ["metal"]), _node("count", [1])]  # 2
    small_count = [_node("scene"), _node("filter_size", [0], ["small"]), _node("count", [1])]  # 2
    cubes = [_node("scene"), _node("filter_shape", [0], ["cube"]), _node("count", [1])]  # 1
    for a, b, fn, want in ((metal_count, small_count, "equal_integer", "yes"), (cubes, small_count, "less_than", "yes"),
                           (cubes, small_count, "greater_than", "no"), (small_count, cubes, "greater_than", "yes")):
        prog = a + [dict(n, inputs=[i + len(a) for i in n["inputs"]]) for n in b]
        prog.append(_node(fn, [len(a) - 1, len(prog) - 1]))
        assert scenes.execute(prog, scene) == want, fn
    sphere = [_node("scene"), _node("filter_shape", [0], ["sphere"]), _node("unique", [1])]
    assert scenes.execute(sphere + [_node("query_material", [2])], scene) == "rubber"
    cylinder = [_node("scene"), _node("filter_shape", [0], ["cylinder"]), _node("unique", [1])]
    two = sphere + [dict(n, inputs=[i + 3 for i in n["inputs"]]) for n in cylinder]
    assert scenes.execute(two + [_node("query_size", [2]), _node("query_size", [5]), _node("equal_size", [6, 7])],
                          scene) == "yes"
    assert scenes.execute(two + [_node("query_color", [2]), _node("query_color", [5]), _node("equal_color", [6, 7])],
                          scene) == "no"
    assert scenes.execute(sphere + [_node("same_color", [2]), _node("count", [3])], scene) == "1"
    assert scenes.execute(sphere + [_node("relate", [2], ["right"]), _node("count", [3])], scene) == "1"
    assert scenes.execute(sphere + [_node("relate", [2], ["front"]), _node("count", [3])], scene) == "2"
    with pytest.raises(scenes.ProgramError, match="unique"):
        scenes.execute(red + [_node("unique", [1])], scene)


def test_the_pixels_give_back_every_objects_attributes(sample):
    root, _ = sample
    _, scene_list = scenes.load_split(root, "train")
    agree, hidden = [], 0
    for s in scene_list:
        with np.load(root / "feats" / "train" / f"{s['image_index']}.npz") as z:
            found = scenes.decode_objects(z["x"], 128)
        assert len(found) == len(s["objects"])
        for o in s["objects"]:
            x, y = o["pixel_coords"][:2]
            same = [f for f in found if f["color"] == o["color"]]
            assert same, f"no {o['color']} region in image {s['image_index']}"
            f = min(same, key=lambda f: (f["x"] - x) ** 2 + (f["y"] - y) ** 2)
            agree.append([f[a] == o[a] for a in ("color", "shape", "size", "material")])
        objs = [scenes.SceneObject(o["color"], o["shape"], o["size"], o["material"], *o["pixel_coords"][:2])
                for o in s["objects"]]
        _, index = scenes.render(objs, 128, None)
        hidden += sum((index == i).sum() < o.mask(128).sum() for i, o in enumerate(objs))
    assert np.mean(agree, axis=0).min() >= 0.98, np.mean(agree, axis=0)
    assert hidden > 0  # occlusion happens


def test_all_families_present_and_answers_balanced(sample):
    root, summary = sample
    questions, _ = scenes.load_split(root, "train")
    assert {scenes.family_of(q["program"]) for q in questions} == set(scenes.FAMILIES)
    baseline = summary["train"]["majority_baseline"]
    assert baseline["count"] < 25 and baseline["query_color"] < 25
    assert all(v <= 65 for f, v in baseline.items()), baseline


def test_counted_sets_stay_within_max_count(sample):
    root, _ = sample
    questions, scene_list = scenes.load_split(root, "train")
    counted = 0
    for q in questions:
        scene, program = scene_list[q["image_index"]], q["program"]
        for k, node in enumerate(program):
            if node["function"] == "count":  # run the program up to this count, independently of the answer
                n = int(scenes.execute(program[:k + 1], scene))
                assert n <= scenes.MAX_COUNT, (q["question"], n)
                counted += 1
    assert counted > 50
    answers = {q["answer"] for q in questions if scenes.family_of(q["program"]) == "count"}
    assert answers == {str(n) for n in range(scenes.MAX_COUNT + 1)}


def test_train_follows_the_mix_and_test_asks_every_family_alike(tmp_path):
    mix = {"count": 4, "equal_integer": 2, "less_than": 2, "greater_than": 2, "equal_color": 2, "equal_shape": 2,
           "equal_size": 2, "equal_material": 2}  # 23 questions per cycle
    scenes.generate(tmp_path, {"train": 12, "test": 12}, seed=1, image_size=96, questions_per_image=23,
                    max_objects=6, features=False, train_mix=mix)
    share = {}
    for split in ("train", "test"):
        questions, _ = scenes.load_split(tmp_path, split)
        counts = {f: 0 for f in scenes.FAMILIES}
        for q in questions:
            counts[scenes.family_of(q["program"])] += 1
        share[split] = {f: c / len(questions) for f, c in counts.items()}
    weights = {f: mix.get(f, 1) for f in scenes.FAMILIES}
    assert share["train"]["count"] > 2.5 * share["train"]["exist"]  # the mix gives count 4, exist 1
    for f, w in weights.items():  # a few draws fail (no unique description): shares within 2 points
        assert abs(share["train"][f] - w / sum(weights.values())) < 0.02, (f, share["train"])
        assert abs(share["test"][f] - 1 / len(scenes.FAMILIES)) < 0.02, (f, share["test"])
    assert scenes.mix_cycle({"count": 3})[:len(scenes.FAMILIES) + 2] == list(scenes.FAMILIES) + ["count"] * 2


def test_bad_arguments_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="split"):
        scenes.generate(tmp_path, {"dev": 1}, seed=0)
    with pytest.raises(DataError, match="min_objects"):
        scenes.generate(tmp_path, {"train": 1}, seed=0, min_objects=5, max_objects=4)
    with pytest.raises(DataError, match="family mix"):
        scenes.generate(tmp_path, {"train": 1}, seed=0, train_mix={"count": 0})


def _counts_by_filters(program: list[dict], scene: dict) -> list[int]:
    """Each `count` step's value read from its chain of filter_<attr> steps back to `scene` and counted on the
    scene's objects directly (not through scenes.execute, which the script uses)."""
    counts = []
    for node in program:
        if node["function"] != "count":
            continue
        wanted, step = {}, program[node["inputs"][0]]
        while step["function"] != "scene":
            wanted[step["function"][len("filter_"):]] = step["value_inputs"][0]
            step = program[step["inputs"][0]]
        counts.append(sum(all(o[a] == v for a, v in wanted.items()) for o in scene["objects"]))
    return counts


def test_count_comparisons_script_scores_predictions_by_the_counts_compared(tmp_path):
    """benchmarks/count_comparisons.py: all answers right gives 100 on every line; answers flipped where the two
    counts are equal give 0 on the |A-B| = 0 lines and 100 elsewhere."""
    import subprocess
    import sys

    mix = {"equal_integer": 3, "less_than": 3, "greater_than": 3}
    scenes.generate(tmp_path, {"test": 10}, seed=4, image_size=96, questions_per_image=12, max_objects=6,
                    features=False, train_mix=mix)
    questions, scene_list = scenes.load_split(tmp_path, "test")
    script = Path(__file__).parent.parent / "benchmarks" / "count_comparisons.py"

    def run(answers: list[str]) -> list[list[str]]:
        (tmp_path / "pred.txt").write_text("\n".join(answers) + "\n")
        out = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "pred.txt")],
                             capture_output=True, text=True, check=True).stdout
        return [line.split() for line in out.splitlines() if line[:1].isalpha() and "questions" not in line]

    rows = run([q["answer"] for q in questions])
    assert rows and all(float(r[-1]) == 100.0 for r in rows)
    flipped = []
    for q in questions:
        tie = False
        if scenes.family_of(q["program"]) in ("equal_integer", "less_than", "greater_than"):
            a, b = _counts_by_filters(q["program"], scene_list[q["image_index"]])
            tie = a == b
        flipped.append({"yes": "no", "no": "yes"}[q["answer"]] if tie else q["answer"])
    rows = run(flipped)
    gap_rows = {(r[0], int(r[1])): (int(r[2]), float(r[3])) for r in rows}
    assert {gap for _, gap in gap_rows} >= {0, 1}
    for (family, gap), (n, accuracy) in gap_rows.items():
        assert n > 0 and accuracy == (0.0 if gap == 0 else 100.0), (family, gap, accuracy)
