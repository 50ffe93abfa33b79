"""The question store: the batches, targets, text and scores of the JSON, rebuilt when a source changes, the
only question data the commands read."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import accuvqa.data.layout as layout_module
import accuvqa.data.question_store as question_store_module
import accuvqa.data.records as records_module
from accuvqa.config import load_config
from accuvqa.data.loader import batch_loader, load_questions, make_dataset
from accuvqa.data.question_store import question_store, store_dir
from accuvqa.data.questions import QuestionArrays, encode_records
from accuvqa.data.records import annotation_file, load_records, question_file
from accuvqa.data.vocab import Vocab, build_vocab, encode_question
from accuvqa.errors import DataError
from accuvqa.evaluate import score_predictions
from accuvqa.metrics import evaluate as vqa_evaluate
from conftest import TINY, batch_from_files, same_batch, write_vqa_layout

FEAT = 12  # write_vqa_layout's feature size


@pytest.fixture
def cfg(tmp_path):
    layout = write_vqa_layout(tmp_path, images_per_split=10)
    return load_config(overrides={"DATASET_PATH": layout["DATASET_PATH"], "FEATURE_PATH": layout["FEATURE_PATH"],
                                  "IMG_FEAT_SIZE": FEAT, "IMG_FEAT_PAD_SIZE": 6, "MAX_TOKEN": 4, "VERBOSE": False})


def _expected(cfg, records, indices, vocab):
    return batch_from_files(records, indices, vocab, cfg.MAX_TOKEN, cfg.IMG_FEAT_PAD_SIZE, cfg.FEATURE_PATH)


def _builds(caplog) -> list[str]:
    """The 'building the question store' lines logged so far."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("building the question store")]


def test_batches_from_the_arrays_equal_batches_from_the_json_bit_for_bit(cfg):
    records = load_records(cfg, "train", need_answers=True)
    vocab = build_vocab(cfg, records)  # mcan-vqa's rules over the JSON, apart from the store
    store = question_store(cfg)
    assert store.path == store_dir(cfg) == store_dir(cfg).parent / "train.qa"
    assert sorted(p.name for p in store.path.iterdir()) == ["meta.json", "test.npz", "train.npz", "val.npz",
                                                              "vocab.json"]
    assert store.meta["questions"] == {"train": 50, "val": 50, "test": 50} and store.splits == ["train", "val", "test"]
    assert store.vocab == vocab  # the stored dictionaries are those of the JSON
    arrays = load_questions(cfg, "train", need_answers=True)
    assert isinstance(arrays, QuestionArrays) and arrays.vocab == vocab
    assert arrays.ques_ix.dtype == np.int32 and arrays.ques_ix.shape == (50, cfg.MAX_TOKEN)
    # the text and the annotators' answers are kept, as the JSON has them
    assert arrays.questions() == [r.question for r in records]
    assert [arrays.question(i) for i in (0, 17, 49)] == [records[i].question for i in (0, 17, 49)]
    assert arrays.gt_answers() == [r.answers for r in records]
    assert arrays.question_id.tolist() == [r.question_id for r in records]
    from_arrays = make_dataset(cfg, arrays, vocab)
    from_records = make_dataset(cfg, records, vocab)  # a Python caller's records, encoded in memory
    order = np.random.default_rng(0).permutation(len(records))
    for batch in np.array_split(order, 4):
        expected = _expected(cfg, records, batch, vocab)  # from the JSON and the .npz files alone
        assert same_batch(from_arrays[batch], expected)
        assert same_batch(from_records[batch], expected)
        for row, i in enumerate(batch):
            tokens = encode_question(records[i].question, vocab.token_to_ix, cfg.MAX_TOKEN)
            assert from_arrays[batch]["ques_ix"][row].tolist() == tokens[: expected["ques_ix"].shape[1]].tolist()
    how_many = next(i for i, r in enumerate(records) if r.question.startswith("How many"))
    scores = from_arrays[[how_many]]["answer_scores"][0]
    # "two" x3 and "2" x5 are one answer "2" (8 annotators: 1.0), "3" x2: 0.6
    expected = torch.zeros(len(vocab.ans_to_ix))
    expected[vocab.ans_to_ix["2"]] = 1.0
    if "3" in vocab.ans_to_ix:
        expected[vocab.ans_to_ix["3"]] = 0.6
    assert torch.equal(scores, expected)


def test_scores_from_the_arrays_equal_the_official_formula_on_the_json_annotations(cfg):
    question_store(cfg)
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


def test_a_changed_source_is_named_and_the_next_command_rebuilds_the_store_from_it(cfg, caplog):
    caplog.set_level(logging.INFO, logger="accuvqa")
    question_store(cfg)
    assert len(_builds(caplog)) == 1
    assert load_questions(cfg, "val", need_answers=True).gt_answers()[0][0] == "black"
    assert len(_builds(caplog)) == 1  # current: read as it is
    path = annotation_file(cfg.DATASET_PATH, "val")
    anns = json.loads(path.read_text())
    anns["annotations"][0]["answers"][0]["answer"] = "white"
    path.write_text(json.dumps(anns))
    val = load_questions(cfg, "val", need_answers=True)  # what a command reads: the store, rebuilt first
    builds = _builds(caplog)
    assert len(builds) == 2 and f"{store_dir(cfg)} (v2_mscoco_val2014_annotations.json changed since it was built" \
        in builds[1] and "accuvqa prepare builds it ahead of time" in builds[1]
    assert isinstance(val, QuestionArrays) and val.gt_answers() == [
        r.answers for r in load_records(cfg, "val", need_answers=True)]  # the changed JSON, read apart
    assert val.gt_answers()[0][0] == "white"
    stored = json.loads((store_dir(cfg) / "meta.json").read_text())
    assert set(stored) == {"plan", "sources", "splits", "vocab", "questions", "dataset_path"}
    assert stored["sources"][str(path.resolve())] == [path.stat().st_size, path.stat().st_mtime_ns]
    # a key that shapes the arrays rebuilds them too
    assert load_questions(cfg.replace(MAX_TOKEN=5), "val", need_answers=True).ques_ix.shape == (50, 5)
    assert "built for other settings" in _builds(caplog)[2]
    # another TRAIN_SPLIT has a store of its own, beside this one
    both = question_store(cfg.replace(TRAIN_SPLIT="train+val"))
    assert both.path.name == "train+val.qa" and store_dir(cfg).is_dir() and both.splits == ["train", "val", "test"]
    assert len(_builds(caplog)) == 4
    question_store(cfg.replace(MAX_TOKEN=5))
    assert len(_builds(caplog)) == 4  # current


def test_with_the_json_moved_away_the_store_stays_current_and_no_json_is_read(cfg, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="accuvqa")
    records = {s: load_records(cfg, s, need_answers=s != "test") for s in ("train", "val", "test")}
    question_store(cfg)
    aside = tmp_path / "aside"
    aside.mkdir()
    for path in sorted(Path(cfg.DATASET_PATH).glob("*.json")):
        shutil.move(path, aside / path.name)

    def no_json(*args, **kwargs):
        raise AssertionError("the JSON was read although the store is current")

    monkeypatch.setattr(layout_module, "load_split", no_json)
    monkeypatch.setattr(records_module, "load_split", no_json)
    for split, expected in records.items():
        arrays = load_questions(cfg, split, need_answers=split != "test")
        assert arrays.question_id.tolist() == [r.question_id for r in expected]
        assert arrays.questions() == [r.question for r in expected]
        assert arrays.gt_answers() == [r.answers for r in expected]
    assert len(_builds(caplog)) == 1
    with pytest.raises(DataError, match=r"missing vg question file .*VG_questions.json \(the question store "
                                        r".*train.qa holds train, val, test\)"):
        load_questions(cfg, "vg", need_answers=True)
    with pytest.raises(DataError, match=r"v2_mscoco_test2015_annotations.json: no annotation for question_id 101"):
        load_questions(cfg, "test", need_answers=True)


def test_a_damaged_store_is_named_with_what_to_do(cfg):
    store = question_store(cfg)
    split = store.path / "val.npz"
    split.write_bytes(split.read_bytes()[:200])
    with pytest.raises(DataError, match=rf"question arrays {split} cannot be read .*; delete {store.path}: the next "
                                        r"command builds it again"):
        load_questions(cfg, "val", need_answers=True)
    (store.path / "vocab.json").write_text("{")
    with pytest.raises(DataError, match=rf"{store.path}/vocab.json cannot be read"):
        load_questions(cfg, "train", need_answers=True)
    shutil.rmtree(store.path)  # as the message says
    assert load_questions(cfg, "val", need_answers=True).gt_answers() == [
        r.answers for r in load_records(cfg, "val", need_answers=True)]


def _interrupt_at_val(cfg, monkeypatch) -> tuple[list, object]:
    """Build the store, interrupted (as by Ctrl-C) when it comes to write val.npz: (splits written, the real writer)."""
    written = []
    write = question_store_module.write_split

    def failing(path, arrays):
        if path.name == "val.npz":
            raise KeyboardInterrupt
        written.append(path.name)
        write(path, arrays)

    monkeypatch.setattr(question_store_module, "write_split", failing)
    with pytest.raises(KeyboardInterrupt):
        question_store(cfg)
    return written, write


def test_an_interrupted_build_leaves_no_store_and_resumes_with_the_splits_it_finished(cfg, monkeypatch):
    written, write = _interrupt_at_val(cfg, monkeypatch)
    final = store_dir(cfg)
    assert not final.exists()  # nothing half-written is ever taken for a store
    partial = final.with_name(final.name + ".partial")
    assert written == ["train.npz"] and sorted(p.name for p in partial.iterdir()) == ["plan.json", "train.npz",
                                                                                        "vocab.json"]
    assert set(json.loads((partial / "plan.json").read_text())) == {"plan", "sources"}
    monkeypatch.setattr(question_store_module, "write_split", lambda path, arrays: (written.append(path.name),
                                                                                   write(path, arrays)))
    store = question_store(cfg)
    assert written == ["train.npz", "val.npz", "test.npz"]  # train was not encoded again
    assert not partial.exists() and store.path == final
    records = load_records(cfg, "train", need_answers=True)
    arrays = store.questions("train", need_answers=True)
    assert store.vocab == build_vocab(cfg, records)
    expected = encode_records(records, store.vocab, cfg.MAX_TOKEN, "train")  # from the JSON, in memory
    for name in ("question_id", "image_id", "ques_ix", "n_tokens", "target_offsets", "target_answer", "target_score",
                 "text", "text_offsets", "gt_offsets", "gt_answer"):
        assert np.array_equal(getattr(arrays, name), getattr(expected, name)), name


def test_an_interrupted_build_whose_sources_changed_since_starts_afresh(cfg, monkeypatch):
    written, write = _interrupt_at_val(cfg, monkeypatch)
    path = question_file(cfg.DATASET_PATH, "train")
    questions = json.loads(path.read_text())
    questions["questions"][0]["question"] = "What colour is the small cat?"
    path.write_text(json.dumps(questions))
    monkeypatch.setattr(question_store_module, "write_split", lambda path, arrays: (written.append(path.name),
                                                                                   write(path, arrays)))
    store = question_store(cfg)
    assert written == ["train.npz", "train.npz", "val.npz", "test.npz"]  # train encoded again, from the new file
    assert store.questions("train", need_answers=True).question(0) == "What colour is the small cat?"
    assert "colour" in store.vocab.token_to_ix


def test_arrays_encoded_with_other_dictionaries_than_the_run_are_encoded_again_from_their_text(cfg, tmp_path,
                                                                                               monkeypatch):
    store = question_store(cfg)
    records = load_records(cfg, "val", need_answers=True)
    vocab = store.vocab
    words = [t for t in vocab.token_to_ix if t not in ("PAD", "UNK")]
    other = Vocab({t: i for i, t in enumerate(["PAD", "UNK", "extra", *reversed(words)])},  # other token ids
                  {a: i for i, a in enumerate(reversed(list(vocab.ans_to_ix)))})  # the answers in another order
    for path in Path(cfg.DATASET_PATH).glob("*.json"):  # no JSON to read: the arrays' text is used
        shutil.move(path, tmp_path / path.name)

    def no_json(*args, **kwargs):
        raise AssertionError("the JSON was read")

    monkeypatch.setattr(records_module, "load_split", no_json)
    monkeypatch.setattr(layout_module, "load_split", no_json)
    arrays = load_questions(cfg, "val", need_answers=True)
    again = arrays.encoded_with(other, cfg.MAX_TOKEN)
    assert again.vocab == other and arrays.vocab == vocab and again is not arrays
    assert arrays.encoded_with(vocab, cfg.MAX_TOKEN) is arrays  # the same dictionaries: nothing to do
    dataset = make_dataset(cfg, arrays, other)
    indices = np.arange(len(records))
    expected = _expected(cfg, records, indices, other)  # the records read before the JSON went away
    assert same_batch(dataset[indices], expected)
    assert not torch.equal(expected["answer_scores"], _expected(cfg, records, indices, vocab)["answer_scores"])


@pytest.mark.slow
def test_training_from_a_current_store_reads_no_json_and_equals_a_run_that_built_it(cfg, tmp_path, monkeypatch):
    """Two tiny runs through train(): one on the fresh tree (train builds the store), one with the store
    current and the JSON moved away: the same metrics and weights; the loader's two workers give the arrays'
    batches unchanged, equal to those computed from the JSON and the .npz files."""
    from accuvqa.train import train

    run = cfg.replace(**TINY, MAX_EPOCH=1, BATCH_SIZE=4, DROPOUT_R=0.0, CKPTS_PATH=str(tmp_path / "ck"),
                      RESULT_PATH=str(tmp_path / "res"))
    records = load_records(cfg, "train", need_answers=True)
    assert not store_dir(cfg).exists()
    train(run.replace(VERSION="built"))
    assert store_dir(cfg).is_dir()
    arrays = load_questions(cfg, "train", need_answers=True)
    dataset = make_dataset(cfg, arrays, arrays.vocab)
    batches = np.array_split(np.arange(len(dataset)), 3)
    in_workers = list(batch_loader(dataset, batches, cfg.replace(NUM_WORKERS=2)))
    assert all(same_batch(a, _expected(cfg, records, b, arrays.vocab)) for a, b in zip(in_workers, batches))
    aside = tmp_path / "aside"
    aside.mkdir()
    for path in Path(cfg.DATASET_PATH).glob("*.json"):
        shutil.move(path, aside / path.name)

    def no_json(*args, **kwargs):
        raise AssertionError("the JSON was read although the store is current")

    monkeypatch.setattr(records_module, "load_split", no_json)
    monkeypatch.setattr(layout_module, "load_split", no_json)
    train(run.replace(VERSION="current"))
    metrics = [json.loads((tmp_path / "res" / v / "metrics.jsonl").read_text()) for v in ("built", "current")]
    assert metrics[0] == metrics[1] and metrics[0]["split"] == "val"
    weights = [torch.load(tmp_path / "ck" / f"ckpt_{v}" / "epoch1.pkl", weights_only=True)["state_dict"]
               for v in ("built", "current")]
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
    store = question_store(both)
    assert store.path == store_dir(both) and store_dir(both).name == "train+val.qa"
    assert store.meta["questions"] == {"train": 50, "val": 50, "test": 50} and store.vocab == vocab
    arrays = load_questions(both, "train+val", need_answers=True)
    assert isinstance(arrays, QuestionArrays) and len(arrays) == 100
    assert arrays.questions() == [r.question for r in records] and arrays.gt_answers() == [r.answers for r in records]
    indices = np.r_[np.arange(45, 60), np.random.default_rng(1).permutation(100)[:25]]
    assert same_batch(make_dataset(both, arrays, vocab)[indices], _expected(both, records, indices, vocab))
    predictions = ["2", "black", "yes", "no", "laptop"] * 20
    assert score_predictions(arrays, predictions) == score_predictions(records, predictions)
    assert arrays.split_names() == "train+val"
