"""Questions and answers as arrays: the same batches, targets and scores as the JSON, used when current."""

import json
import logging

import numpy as np
import pytest
import torch

import accuvqa.data.loader as loader
import accuvqa.data.qa_store as qa_store
from accuvqa.config import load_config
from accuvqa.data.loader import batch_loader, load_questions, make_dataset
from accuvqa.data.qa_store import QAStore, QuestionArrays, prepare_qa_store, store_dir
from accuvqa.data.records import annotation_file, load_records
from accuvqa.data.vocab import Vocab, build_vocab, encode_question
from accuvqa.evaluate import score_predictions
from accuvqa.metrics import evaluate as vqa_evaluate
from conftest import TINY, write_vqa_layout

FEAT = 12  # write_vqa_layout's feature size


@pytest.fixture
def cfg(tmp_path):
    layout = write_vqa_layout(tmp_path, images_per_split=10)
    return load_config(overrides={"DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
                                  "IMG_FEAT_SIZE": FEAT, "IMG_FEAT_PAD_SIZE": 6, "MAX_TOKEN": 4, "VERBOSE": False})


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_batches_from_the_arrays_equal_batches_from_the_json_bit_for_bit(cfg):
    records = load_records(cfg, "train", need_answers=True)
    vocab = build_vocab(cfg, records)
    from_json = make_dataset(cfg, records, vocab)
    path, counts = prepare_qa_store(cfg)
    assert path == store_dir(cfg) and counts == {"train": 50, "val": 50, "test": 50}
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "test.npz", "train.npz", "val.npz", "vocab.json"]
    arrays = load_questions(cfg, "train", need_answers=True)
    assert isinstance(arrays, QuestionArrays) and arrays.records is None
    assert arrays.ques_ix.dtype == np.int32 and arrays.ques_ix.shape == (50, cfg.MAX_TOKEN)
    assert build_vocab(cfg, arrays) == vocab  # the stored dictionaries are those of the JSON
    from_arrays = make_dataset(cfg, arrays, vocab)
    assert from_arrays.records is None
    order = np.random.default_rng(0).permutation(len(records))
    for batch in np.array_split(order, 4):
        a, b = from_json[batch], from_arrays[batch]
        assert _equal(a, b)
        # against the question text and the annotators' answers, computed apart from the arrays
        for row, i in enumerate(batch):
            tokens = encode_question(records[i].question, vocab.token_to_ix, cfg.MAX_TOKEN)
            assert b["ques_ix"][row].tolist() == tokens[: b["ques_ix"].shape[1]].tolist()
    how_many = next(i for i, r in enumerate(records) if r.question.startswith("How many"))
    scores = from_arrays[[how_many]]["answer_scores"][0]
    # "two" x3 and "2" x5 are one answer "2" (8 annotators: 1.0), "3" x2: 0.6
    expected = torch.zeros(len(vocab.ans_to_ix))
    expected[vocab.ans_to_ix["2"]] = 1.0
    if "3" in vocab.ans_to_ix:
        expected[vocab.ans_to_ix["3"]] = 0.6
    assert torch.equal(scores, expected)


def test_scores_from_the_arrays_equal_the_official_formula_on_the_json_annotations(cfg):
    prepare_qa_store(cfg)
    arrays = load_questions(cfg, "val", need_answers=True)
    records = load_records(cfg, "val", need_answers=True)
    predictions = ["2", "yes", "black", "laptop", "no"] * 10
    from_arrays = score_predictions(arrays, predictions)
    assert from_arrays == score_predictions(records, predictions)
    # independent: the annotation file as it is, through the official formula
    anns = json.loads(annotation_file(cfg.DATASET_PATH, "val").read_text())["annotations"]
    expected = vqa_evaluate(
        dict(zip([a["question_id"] for a in anns], predictions)),
        {a["question_id"]: {"answers": [x["answer"] for x in a["answers"]], "answer_type": a["answer_type"],
                            "question_type": a["question_type"]} for a in anns})
    assert from_arrays == expected


def test_a_stale_store_is_named_and_the_json_is_read_until_prepare_runs_again(cfg, caplog):
    prepare_qa_store(cfg)
    assert isinstance(load_questions(cfg, "train", need_answers=True), QuestionArrays)
    path = annotation_file(cfg.DATASET_PATH, "val")
    anns = json.loads(path.read_text())
    anns["annotations"][0]["answers"][0]["answer"] = "white"
    path.write_text(json.dumps(anns))
    with caplog.at_level(logging.WARNING):
        records = load_questions(cfg, "val", need_answers=True)
    assert isinstance(records, list) and records[0].answers[0] == "white"
    assert any(f"question arrays in {store_dir(cfg)} are stale" in r.getMessage()
               and "run accuvqa prepare" in r.getMessage() for r in caplog.records)
    # a key that changes the arrays makes the store stale too
    prepare_qa_store(cfg)
    assert load_questions(cfg, "val", need_answers=True).gt_answers()[0][0] == "white"
    assert QAStore.open(cfg.replace(MAX_TOKEN=5), quiet=True) is None
    assert QAStore.open(cfg.replace(TRAIN_SPLIT="train+val"), quiet=True) is None  # another split set's store
    assert QAStore.open(cfg, quiet=True) is not None


def test_an_interrupted_prepare_leaves_no_store_and_resumes_with_the_splits_it_finished(cfg, monkeypatch):
    written = []
    save = qa_store._save_split

    def failing(path, arrays, records):
        if path.name == "val.npz":
            raise KeyboardInterrupt
        written.append(path.name)
        save(path, arrays, records)

    monkeypatch.setattr(qa_store, "_save_split", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_qa_store(cfg)
    assert not store_dir(cfg).exists() and QAStore.open(cfg) is None
    partial = store_dir(cfg).with_name(store_dir(cfg).name + ".partial")
    assert written == ["train.npz"] and (partial / "train.npz").is_file()
    monkeypatch.setattr(qa_store, "_save_split", lambda path, arrays, records: (written.append(path.name),
                                                                               save(path, arrays, records)))
    prepare_qa_store(cfg)
    assert written == ["train.npz", "val.npz", "test.npz"]  # train was not encoded again
    assert not partial.exists() and QAStore.open(cfg) is not None


def test_arrays_encoded_with_other_dictionaries_than_the_run_are_encoded_again_from_the_json(cfg):
    prepare_qa_store(cfg)
    records = load_records(cfg, "val", need_answers=True)
    vocab = build_vocab(cfg, records)
    other = Vocab({**vocab.token_to_ix, "extra": len(vocab.token_to_ix)}, dict(reversed(vocab.ans_to_ix.items())))
    other.ans_to_ix = {a: i for i, a in enumerate(other.ans_to_ix)}  # the answers in another order
    dataset = make_dataset(cfg, load_questions(cfg, "val", need_answers=True), other)
    assert dataset.records is not None  # re-encoded from the JSON
    indices = np.arange(len(records))
    assert _equal(dataset[indices], make_dataset(cfg, records, other)[indices])


@pytest.mark.slow
def test_training_and_evaluation_from_the_arrays_equal_those_from_the_json(cfg, tmp_path, monkeypatch):
    """Two tiny runs through train(), one reading the JSON, one the arrays: the same metrics and weights;
    the loader's two workers give the arrays' batches unchanged."""
    from accuvqa.train import train

    run = cfg.replace(**TINY, MAX_EPOCH=1, BATCH_SIZE=4, DROPOUT_R=0.0, CKPTS_PATH=str(tmp_path / "ck"),
                      RESULT_PATH=str(tmp_path / "res"))
    train(run.replace(VERSION="json"))
    prepare_qa_store(cfg)
    arrays = load_questions(cfg, "train", need_answers=True)
    assert isinstance(arrays, QuestionArrays)
    dataset = make_dataset(cfg, arrays, arrays.vocab)
    batches = np.array_split(np.arange(len(dataset)), 3)
    in_workers = list(batch_loader(dataset, batches, cfg.replace(NUM_WORKERS=2)))
    assert all(_equal(a, dataset[b]) for a, b in zip(in_workers, batches))
    def no_json(*args):
        raise AssertionError("the JSON was read although the arrays are current")

    monkeypatch.setattr(loader, "load_records", no_json)
    train(run.replace(VERSION="arrays"))
    metrics = [json.loads((tmp_path / "res" / v / "metrics.jsonl").read_text()) for v in ("json", "arrays")]
    assert metrics[0] == metrics[1] and metrics[0]["split"] == "val"
    weights = [torch.load(tmp_path / "ck" / f"ckpt_{v}" / "epoch1.pkl", weights_only=True)["state_dict"]
               for v in ("json", "arrays")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_store_of_several_splits_gives_the_batches_and_scores_of_their_json(cfg):
    both = cfg.replace(TRAIN_SPLIT="train+val")
    path = annotation_file(cfg.DATASET_PATH, "val")
    anns = json.loads(path.read_text())
    for ann in anns["annotations"][:5]:  # val's first questions answered apart from train's alike ones
        ann["answers"] = [{**a, "answer": "yes"} for a in ann["answers"]]
    path.write_text(json.dumps(anns))
    records = load_records(both, "train+val", need_answers=True)
    vocab = build_vocab(both, records)
    _, counts = prepare_qa_store(both)
    assert store_dir(both).name == "train+val.qa" and counts == {"train": 50, "val": 50, "test": 50}
    arrays = load_questions(both, "train+val", need_answers=True)
    assert isinstance(arrays, QuestionArrays) and len(arrays) == 100 and build_vocab(both, arrays) == vocab
    indices = np.r_[np.arange(45, 60), np.random.default_rng(1).permutation(100)[:25]]
    assert _equal(make_dataset(both, arrays, vocab)[indices], make_dataset(both, records, vocab)[indices])
    predictions = ["2", "black", "yes", "no", "laptop"] * 20
    assert score_predictions(arrays, predictions) == score_predictions(records, predictions)
    assert arrays.split_names() == "train+val"
