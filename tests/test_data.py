"""Data: mcan-vqa's tokenizer and answer rules, the VQA v2 reader, easy-VQA features."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from accuvqa.config import load_config
from accuvqa.data.easyvqa import image_features
from accuvqa.data.dataset import VQADataset
from accuvqa.data.feature_store import open_features
from accuvqa.data.features import index_features, read_features
from accuvqa.data.questions import encode_records
from accuvqa.data.records import load_split
from accuvqa.data.vocab import (Vocab, answer_targets, build_answer_dict, build_token_dict, encode_question,
                                soft_score, tokenize)
from accuvqa.errors import DataError


def test_tokenizer_follows_mcan_vqa():
    assert tokenize("What's the man's T-shirt / hat color?") == ["whats", "the", "mans", "t", "shirt", "hat", "color"]
    assert tokenize('"Is (it)" #1: yes; no!*') == ["is", "it", "1", "yes", "no"]


def test_token_ids_in_first_seen_order_after_pad_and_unk():
    d = build_token_dict(["Is it red?", "is IT blue?"])
    assert d == {"PAD": 0, "UNK": 1, "is": 2, "it": 3, "red": 4, "blue": 5}
    ids = encode_question("Is it green, or red?", d, max_token=4)
    assert ids.tolist() == [2, 3, 1, 1]  # green, or -> UNK; cut at MAX_TOKEN
    assert encode_question("red", d, max_token=3).tolist() == [4, 0, 0]


def test_answer_dict_keeps_answers_seen_more_than_eight_times():
    answers = ["yes"] * 9 + ["Two"] * 9 + ["no"] * 8 + ["2"]
    ans_to_ix, ix_to_ans = build_answer_dict(answers)
    # "Two" is normalised to "2" (the official rule): 10 times, kept; "no" only 8 times.
    assert ans_to_ix == {"yes": 0, "2": 1} and ix_to_ans == {"0": "yes", "1": "2"}


def test_soft_scores_count_matching_annotators():
    assert [soft_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    targets = dict(answer_targets(["two"] * 3 + ["2"] * 5 + ["3"] * 2 + [], {"2": 0, "3": 1, "4": 2}))
    assert targets == {0: 1.0, 1: 0.6}


def test_reader_joins_questions_with_annotations(vqa_layout):
    train = load_split(vqa_layout["DATASET_PATH"], "train", need_answers=True)
    assert len(train) == vqa_layout["counts"]["train"]
    first = train[0]
    assert first.question == "What color is the cat?" and first.folder == "train2014"
    assert first.answers == ("black",) * 6 + ("dark",) * 4 and first.answer_type == "other"
    test = load_split(vqa_layout["DATASET_PATH"], "test", need_answers=False)
    assert all(r.answers is None for r in test)


def test_missing_annotation_file_is_named(vqa_layout):
    with pytest.raises(DataError, match=r"missing test annotation file .*v2_mscoco_test2015_annotations.json"):
        load_split(vqa_layout["DATASET_PATH"], "test", need_answers=True)


def test_batches_pad_cut_and_score_like_mcan_vqa(vqa_layout):
    cfg = load_config(overrides={**{k: vqa_layout[k] for k in ("DATASET_PATH", "FEATURE_PATH")},
                                 "IMG_FEAT_SIZE": 12, "IMG_FEAT_PAD_SIZE": 6, "MAX_TOKEN": 5})
    records = load_split(cfg.DATASET_PATH, "train", need_answers=True)
    token_to_ix = build_token_dict(r.question for r in records)
    ans_to_ix = {"black": 0, "2": 1, "yes": 2, "laptop": 3}
    features = index_features(cfg.FEATURE_PATH, ["train2014"])
    questions = encode_records(records, Vocab(token_to_ix, ans_to_ix), cfg.MAX_TOKEN)
    ds = VQADataset(cfg, questions, open_features(cfg.FEATURE_PATH, ["train2014"], cfg.IMG_FEAT_SIZE))
    batch = ds[[0, 1, 4, 7]]
    # independent reading of the raw files: x stored (D, N), first IMG_FEAT_PAD_SIZE regions kept
    raws = [np.load(features[records[i].image_id])["x"].T[:6] for i in (0, 1, 4, 7)]
    n_max = max(r.shape[0] for r in raws)
    assert batch["img_feat"].shape == (4, n_max, 12)
    for b, raw in enumerate(raws):
        np.testing.assert_array_equal(batch["img_feat"][b, : len(raw)].numpy(), raw)
        assert not batch["img_feat"][b, len(raw):].any()  # zero padding
    assert batch["ques_ix"].shape == (4, 5)  # "what is on the table top" cut to MAX_TOKEN
    assert batch["ques_ix"][0].tolist()[:5] == [token_to_ix[w] for w in ["what", "color", "is", "the", "cat"]]
    want = np.zeros((4, 4), np.float32)
    want[0, 0] = 1.0  # black x6
    want[1, 1] = 1.0  # "two" x3 + "2" x5 -> "2" x8
    want[2, 3] = 1.0  # "a laptop" x4 + "laptop" x4 -> "laptop" x8
    want[3, 2] = 1.0  # question 7 is "Is it raining?": yes x9
    np.testing.assert_allclose(batch["answer_scores"].numpy(), want)


def test_corrupt_feature_file_is_named(vqa_layout, tmp_path):
    bad = tmp_path / "COCO_train2014_000000000001.jpg.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"cannot read region features .*000000000001.jpg.npz"):
        read_features(bad, 12, 100)
    good = next(iter(index_features(vqa_layout["FEATURE_PATH"], ["val2014"]).values()))
    with pytest.raises(DataError, match=r"neither side is IMG_FEAT_SIZE 2048; if these are 12-d features of \d+ regions, set IMG_FEAT_SIZE 12"):
        read_features(good, 2048, 100)


def _drawn(shape: str, colour: tuple) -> np.ndarray:
    img = Image.new("RGB", (64, 64), (245, 240, 235))
    draw = ImageDraw.Draw(img)
    if shape == "rectangle":
        draw.rectangle([10, 20, 40, 40], fill=colour)
    elif shape == "circle":
        draw.ellipse([12, 12, 44, 44], fill=colour)
    else:
        draw.polygon([(32, 8), (8, 52), (56, 52)], fill=colour)
    return np.asarray(img)


@pytest.mark.parametrize("shape,fill", [("rectangle", (0.97, 1.0)), ("circle", (0.74, 0.84)), ("triangle", (0.45, 0.6))])
def test_easyvqa_object_region_carries_colour_box_and_shape(shape, fill):
    x, boxes = image_features(_drawn(shape, (0, 0, 255)))
    assert x.shape == (32, 5) and boxes.shape == (5, 4)
    obj = x[:, 0]
    np.testing.assert_allclose(obj[0:3], [0, 0, 1], atol=0.02)  # blue
    assert fill[0] <= obj[8] <= fill[1]
    assert np.all(np.abs(x).sum(axis=0) > 0)  # no region row is all zero (it would be masked)
    if shape == "rectangle":
        np.testing.assert_allclose(boxes[0], [10, 20, 41, 41])


def test_prepare_writes_the_vqa_v2_layout(easyvqa_slice):
    import easy_vqa

    qpath = f"{easyvqa_slice['DATASET_PATH']}/v2_OpenEnded_mscoco_test2015_questions.json"
    questions = json.load(open(qpath))["questions"]
    ids = set(sorted(easy_vqa.get_test_image_paths())[:240])
    _, answers, image_ids = easy_vqa.get_test_questions()
    assert len(questions) == sum(1 for i in image_ids if i in ids) == easyvqa_slice["summary"]["test"]["questions"]
    ann = json.load(open(f"{easyvqa_slice['DATASET_PATH']}/v2_mscoco_test2015_annotations.json"))["annotations"]
    assert all(len(a["answers"]) == 10 and len({x["answer"] for x in a["answers"]}) == 1 for a in ann)
    npz = np.load(f"{easyvqa_slice['FEATURE_PATH']}/test2015/COCO_test2015_{questions[0]['image_id']:012d}.jpg.npz")
    assert npz["x"].shape == (32, 5) and int(npz["num_bbox"]) == 5 and int(npz["image_w"]) == 64
    train = load_split(easyvqa_slice["DATASET_PATH"], "train", need_answers=True)
    val = load_split(easyvqa_slice["DATASET_PATH"], "val", need_answers=True)
    assert not {r.image_id for r in train} & {r.image_id for r in val}  # held out by image
