"""Checkpoints written by the original mcan-vqa load, answer as the original network, and resume.

The original's weights, inputs and sigmoid outputs come from tests/data/mcan_reference.pt (see
tests/data/make_mcan_reference.py). A checkpoint in mcan-vqa's format holds only `state_dict`,
`optimizer` and `lr_base`; the dictionaries come from pinned files in mcan-vqa's formats.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from accuvqa.checkpoint import load_checkpoint
from accuvqa.cli import main
from accuvqa.config import load_config
from accuvqa.data.vocab import encode_question
from accuvqa.checkpoint import load_trained
from accuvqa.train import train

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = torch.load(ROOT / "tests/data/mcan_reference.pt", weights_only=True)
TOKEN_SIZE, ANSWER_SIZE = REFERENCE["token_size"], REFERENCE["answer_size"]  # 30, 11
MODEL_KEYS = ("LAYER", "HIDDEN_SIZE", "MULTI_HEAD", "FF_SIZE", "FLAT_MLP_SIZE", "FLAT_GLIMPSES",
              "FLAT_OUT_SIZE", "WORD_EMBED_SIZE", "IMG_FEAT_SIZE", "DROPOUT_R")
ANSWERS = ["yes", "no", "2", "black", "laptop"] + [f"ans{i}" for i in range(5, ANSWER_SIZE)]
MATCHES = (3, 1, 2, 0)  # annotators (of ten) who gave the original network's answer, per question


def word(token_id: int) -> str:
    """A question word with this id in the pinned token dictionary (id 1, UNK: a word not in it)."""
    return "notinthedictionary" if token_id == 1 else f"w{token_id}"


def mcan_optimizer_state(case: dict) -> dict:
    """Adam's state after one step over the original's parameters, in torch 1.x's layout."""
    params = [v.clone().requires_grad_(True) for v in case["state_dict"].values()]  # original's order
    adam = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 0.01 * (i + 1))
    adam.step()
    state = adam.state_dict()
    keep = ("lr", "betas", "eps", "weight_decay", "amsgrad", "params")  # torch 1.x's group keys
    return {"state": {k: {"step": 1, "exp_avg": v["exp_avg"], "exp_avg_sq": v["exp_avg_sq"]}
                      for k, v in state["state"].items()},
            "param_groups": [{k: g[k] for k in keep} for g in state["param_groups"]]}


def write_original_run(root: Path, case_name: str, answers: list[str] = ANSWERS) -> dict:
    """mcan-vqa checkpoint, pinned dictionaries, and a val split made of the reference inputs."""
    case = REFERENCE["cases"][case_name]
    ckpt = root / "mcan_epoch13.pkl"
    torch.save({"state_dict": case["state_dict"], "optimizer": mcan_optimizer_state(case), "lr_base": 1e-4}, ckpt)
    token_dict = root / "token_to_ix.json"
    token_dict.write_text(json.dumps({"PAD": 0, "UNK": 1, **{word(i): i for i in range(2, TOKEN_SIZE)}}))
    answer_dict = root / "answer_dict.json"  # mcan-vqa's core/data/answer_dict.json format
    answer_dict.write_text(json.dumps([{a: i for i, a in enumerate(answers)},
                                       {str(i): a for i, a in enumerate(answers)}]))
    dataset, features = root / "vqa", root / "feats" / "val2014"
    dataset.mkdir()
    features.mkdir(parents=True)
    probs = case["probs"]
    questions, annotations = [], []
    for b in range(probs.shape[0]):
        image_id = 500 + b
        # all 7 regions, trailing zero ones included: the loader gives the network the stored input
        np.savez(features / f"COCO_val2014_{image_id:012d}.jpg.npz", x=case["img_feat"][b].numpy().T)
        ids = [int(t) for t in case["ques_ix"][b] if t != 0]
        questions.append({"question_id": 10 + b, "image_id": image_id, "question": " ".join(map(word, ids))})
        top, bottom = int(probs[b].argmax()), int(probs[b].argmin())
        gts = [ANSWERS[top]] * MATCHES[b] + [ANSWERS[bottom]] * (10 - MATCHES[b])
        annotations.append({"question_id": 10 + b, "image_id": image_id, "question_type": "what",
                            "answer_type": "other", "multiple_choice_answer": gts[-1],
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                        for k, a in enumerate(gts)]})
    (dataset / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (dataset / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    overrides = {**{k: str(case["cfg"][k]) for k in MODEL_KEYS}, "DATASET_PATH": str(dataset),
                 "FEATURE_PATH": str(root / "feats"), "TOKEN_DICT_PATH": str(token_dict),
                 "ANSWER_DICT_PATH": str(answer_dict), "RESULT_PATH": str(root / "results"),
                 "VERSION": "orig", "DEVICE": "cpu", "NUM_THREADS": "2", "VERBOSE": "False"}
    return {"ckpt": ckpt, "overrides": overrides, "case": case, "root": root}


def official_accuracy_of_the_original() -> float:
    """Hand count: the original's answer given by m of ten annotators scores the mean over the ten
    leave-one-out subsets of min(1, matches / 3); overall is the mean over questions, in percent."""
    per_question = [sum(min(1.0, (m - (i < m)) / 3) for i in range(10)) / 10 for m in MATCHES]
    return 100 * sum(per_question) / len(per_question)  # (0.9 + 0.3 + 0.6 + 0) / 4 = 45 %


def cli_args(run: dict, **more: str) -> list[str]:
    overrides = {**run["overrides"], "CKPT_PATH": str(run["ckpt"]), **more}
    return [x for k, v in overrides.items() for x in (f"--{k}", v)]


@pytest.mark.parametrize("case_name", ["layer2", "glimpses2"])
def test_loads_strictly_and_answers_like_the_original(tmp_path, case_name):
    run = write_original_run(tmp_path, case_name)
    cfg = load_config(overrides={**run["overrides"], "CKPT_PATH": str(run["ckpt"])})
    model, vocab, path, _ = load_trained(cfg, torch.device("cpu"))
    assert path == run["ckpt"] and len(vocab.token_to_ix) == TOKEN_SIZE and len(vocab.ans_to_ix) == ANSWER_SIZE
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(run["case"]["img_feat"], run["case"]["ques_ix"]))
    torch.testing.assert_close(probs, run["case"]["probs"], atol=1e-5, rtol=0)


def test_cli_val_accuracy_equals_the_official_accuracy_of_the_originals_answers(tmp_path):
    run = write_original_run(tmp_path, "layer2")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "accuvqa.cli", "val", *cli_args(run)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    expected = official_accuracy_of_the_original()
    assert f"accuracy           {expected:.2f}%" in r.stdout
    line = json.loads((tmp_path / "results/orig/metrics.jsonl").read_text().splitlines()[-1])
    assert line["split"] == "val" and line["accuracy"] == pytest.approx(expected, abs=1e-9)


def test_val_in_process_on_the_second_case(tmp_path, capsys):
    run = write_original_run(tmp_path, "glimpses2")
    with pytest.raises(SystemExit) as e:
        main(["val", *cli_args(run)])
    assert e.value.code == 0, capsys.readouterr().err
    line = json.loads((tmp_path / "results/orig/metrics.jsonl").read_text().splitlines()[-1])
    assert line["accuracy"] == pytest.approx(official_accuracy_of_the_original(), abs=1e-9)


def test_answer_dictionary_one_short_names_both_sizes(tmp_path, capsys):
    run = write_original_run(tmp_path, "layer2", answers=ANSWERS[:-1])
    with pytest.raises(SystemExit) as e:
        main(["val", *cli_args(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "proj.weight has 11 rows but the answer dictionary has 10 entries" in err
    assert "ANSWER_DICT_PATH" in err


def test_data_parallel_prefix_of_multi_gpu_checkpoints_is_removed(tmp_path):
    run = write_original_run(tmp_path, "glimpses2")
    state = torch.load(run["ckpt"], weights_only=True)
    state["state_dict"] = {f"module.{k}": v for k, v in state["state_dict"].items()}
    torch.save(state, run["ckpt"])
    cfg = load_config(overrides={**run["overrides"], "CKPT_PATH": str(run["ckpt"])})
    model, _, _, _ = load_trained(cfg, torch.device("cpu"))
    for key, value in run["case"]["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_resume_from_an_mcan_checkpoint_counts_epochs_and_updates_like_mcan(tmp_path, vqa_layout):
    (tmp_path / "orig").mkdir()
    run = write_original_run(tmp_path / "orig", "glimpses2")  # IMG_FEAT_SIZE 12, as the vqa_layout fixture
    ckpts = tmp_path / "ckpts"
    (ckpts / "ckpt_v").mkdir(parents=True)
    original = torch.load(run["ckpt"], weights_only=True)
    torch.save(original, ckpts / "ckpt_v" / "epoch2.pkl")
    batch_size, train_questions = 8, vqa_layout["counts"]["train"]
    cfg = load_config(overrides={
        **run["overrides"], "DATASET_PATH": vqa_layout["DATASET_PATH"], "FEATURE_PATH": vqa_layout["FEATURE_PATH"],
        "CKPTS_PATH": str(ckpts), "RESUME": "True", "CKPT_VERSION": "v", "CKPT_EPOCH": "2", "MAX_EPOCH": "3",
        "VERSION": "resumed", "BATCH_SIZE": str(batch_size), "EVAL_EVERY_EPOCH": "False"})
    summary = train(cfg)

    assert sorted(p.name for p in (ckpts / "ckpt_resumed").iterdir()) == ["epoch3.pkl", "latest.json"]  # epoch 3 only
    state = load_checkpoint(ckpts / "ckpt_resumed" / "epoch3.pkl")
    assert state["epoch"] == 3
    # mcan-vqa resumes its update counter at int(data_size / BATCH_SIZE * CKPT_EPOCH), then one epoch
    updates = train_questions // batch_size
    assert state["step"] == summary["updates"] == int(train_questions / batch_size * 2) + updates
    # Adam's moments continued: one step in the file, plus this run's updates
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {1 + updates}
    changed = [k for k, v in original["state_dict"].items() if not torch.equal(state["state_dict"][k], v)]
    assert len(changed) == len(original["state_dict"])


def test_without_a_pinned_token_dictionary_it_is_rebuilt_from_the_question_files(tmp_path):
    """mcan-vqa's rule: tokens in first-seen order over the train, val, test (and vg) question files."""
    run = write_original_run(tmp_path, "layer2")
    case = run["case"]
    overrides = {k: v for k, v in run["overrides"].items() if k != "TOKEN_DICT_PATH"}
    pinned = json.loads((tmp_path / "token_to_ix.json").read_text())
    rows = [b for b in range(case["ques_ix"].shape[0]) if 1 not in case["ques_ix"][b].tolist()]  # no UNK word
    questions = [" ".join(word(int(t)) for t in case["ques_ix"][b] if t != 0) for b in rows]
    val_file = tmp_path / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json"
    val_file.write_text(json.dumps({"questions": [{"question_id": 10 + b, "image_id": 500 + b, "question": q}
                                                  for b, q in zip(rows, questions)]}))
    train_file = tmp_path / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json"
    cfg = load_config(overrides={**overrides, "CKPT_PATH": str(run["ckpt"])})

    def answers_to_questions_as_read(first_words: list[str]):
        """Rebuild the dictionary with a train file seen first, then answer the questions it encodes."""
        train_file.write_text(json.dumps({"questions": [
            {"question_id": 1, "image_id": 1, "question": " ".join(first_words)}]}))
        model, vocab, _, _ = load_trained(cfg, torch.device("cpu"))
        ques_ix = torch.stack([torch.from_numpy(encode_question(q, vocab.token_to_ix, case["ques_ix"].shape[1]))
                               for q in questions])
        model.eval()
        with torch.no_grad():
            return vocab, ques_ix, torch.sigmoid(model(case["img_feat"][rows], ques_ix))

    # every word in id order, read first: the rebuilt ids are the pinned ones, the answers the original's
    vocab, ques_ix, probs = answers_to_questions_as_read([word(i) for i in range(2, TOKEN_SIZE)])
    assert vocab.token_to_ix == pinned and torch.equal(ques_ix, case["ques_ix"][rows])
    torch.testing.assert_close(probs, case["probs"][rows], atol=1e-5, rtol=0)
    # the same words first seen in another order: other ids, other answers
    vocab, ques_ix, probs = answers_to_questions_as_read([word(i) for i in reversed(range(2, TOKEN_SIZE))])
    assert vocab.token_to_ix[word(2)] == TOKEN_SIZE - 1
    assert float((probs - case["probs"][rows]).abs().max()) > 1e-3
