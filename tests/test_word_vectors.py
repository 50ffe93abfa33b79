"""Word vectors (USE_GLOVE): GloVe text files and spaCy packages, row by row as mcan-vqa fills them."""

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

from accuvqa.checkpoint import load_checkpoint
from accuvqa.config import load_config
from accuvqa.data.vocab import save_answer_dict
from accuvqa.data.word_vectors import load_pretrained_embedding
from accuvqa.errors import DataError
from accuvqa.train import train

TOKENS = {"PAD": 0, "UNK": 1, "what": 2, "color": 3, "is": 4, "zebra": 5}
GLOVE_LINES = [
    "what 0.5 -1 2 0.25",
    "color 1 2 3 4",
    "is -0.5 0 0.125 8",
    "what 9 9 9 9",  # a repeated word: the first line counts
    "UNK 0.1 0.2 0.3 0.4",  # looked up like any word, as spaCy looks up the string "UNK"
    "new york 7 7 7 7",  # GloVe 840B has words with spaces; never one of our tokens
    "unused 3 3 3 3",
]


def glove_file(tmp_path: Path, lines=GLOVE_LINES, name: str = "glove.txt") -> Path:
    path = tmp_path / name
    text = "\n".join(lines) + "\n"
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def cfg_for(source, size: int = 4, **more):
    return load_config(overrides={"USE_GLOVE": True, "WORD_VECTORS": str(source), "WORD_EMBED_SIZE": size, **more})


@pytest.mark.parametrize("name", ["glove.txt", "glove.txt.gz"])
def test_glove_rows_follow_token_ids_and_missing_words_are_zero(tmp_path, name):
    rows = load_pretrained_embedding(cfg_for(glove_file(tmp_path, name=name)), TOKENS)
    expected = np.array([
        [0, 0, 0, 0],  # PAD: not in the file
        [0.1, 0.2, 0.3, 0.4],  # UNK
        [0.5, -1, 2, 0.25],  # what (first of two lines)
        [1, 2, 3, 4],  # color
        [-0.5, 0, 0.125, 8],  # is
        [0, 0, 0, 0],  # zebra: not in the file
    ], dtype=np.float32)
    assert rows.dtype == np.float32 and rows.shape == (6, 4)
    np.testing.assert_array_equal(rows, expected)


def test_word2vec_header_line_is_skipped(tmp_path):
    rows = load_pretrained_embedding(cfg_for(glove_file(tmp_path, ["2 4", "is 1 1 1 1", "color 2 2 2 2"])), TOKENS)
    np.testing.assert_array_equal(rows[[3, 4]], [[2, 2, 2, 2], [1, 1, 1, 1]])


def test_vector_size_differing_from_word_embed_size_names_both(tmp_path):
    with pytest.raises(DataError, match=r"glove.txt has 4-dimensional vectors but WORD_EMBED_SIZE is 300"):
        load_pretrained_embedding(cfg_for(glove_file(tmp_path), size=300), TOKENS)


def test_missing_glove_file_is_named_with_the_install_hint(tmp_path):
    with pytest.raises(DataError) as e:
        load_pretrained_embedding(cfg_for(tmp_path / "nope" / "glove.840B.300d.txt"), TOKENS)
    assert "glove.840B.300d.txt does not exist" in str(e.value) and "pip install spacy" in str(e.value)


def test_spacy_not_installed_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` now raises ImportError
    with pytest.raises(DataError) as e:
        load_pretrained_embedding(cfg_for("en_vectors_web_lg", size=300), TOKENS)
    message = str(e.value)
    assert "'en_vectors_web_lg'" in message and "spaCy, which is not installed" in message
    assert "pip install spacy" in message and "GloVe text file" in message


def test_spacy_rows_are_the_vector_of_each_word_as_a_doc(tmp_path):
    """Real spaCy (skipped where it is not installed): a word its tokenizer splits gets the mean."""
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    for word, vec in {"what": [0, 1, 2, 3], "ca": [1, 1, 1, 1], "nt": [3, 3, 3, 3], "PAD": [7, 7, 7, 7]}.items():
        nlp.vocab.set_vector(word, np.array(vec, dtype=np.float32))
    nlp.to_disk(tmp_path / "vectors_model")
    assert [t.text for t in nlp.make_doc("cant")] == ["ca", "nt"]
    rows = load_pretrained_embedding(cfg_for(tmp_path / "vectors_model"),
                                     {"PAD": 0, "UNK": 1, "what": 2, "cant": 3, "zebra": 4})
    np.testing.assert_array_equal(rows, [[7] * 4, [0] * 4, [0, 1, 2, 3], [2] * 4, [0] * 4])
    with pytest.raises(DataError, match="has 4-dimensional vectors but WORD_EMBED_SIZE is 5"):
        load_pretrained_embedding(cfg_for(tmp_path / "vectors_model", size=5), TOKENS)


def test_training_starts_from_the_files_vectors(vqa_layout, tmp_path):
    """LR_BASE 1e-30: one epoch of Adam cannot move the weights, so the checkpoint shows the start."""
    rng = np.random.default_rng(0)
    file_vectors = {w: rng.normal(size=16).round(4) for w in ("what", "color", "cat", "dogs", "UNK")}
    glove = glove_file(tmp_path, [f"{w} " + " ".join(map(str, v)) for w, v in file_vectors.items()])
    answers = ["yes", "no", "2", "black", "laptop"]
    save_answer_dict(tmp_path / "answers.json", {a: i for i, a in enumerate(answers)},
                     {str(i): a for i, a in enumerate(answers)})
    cfg = load_config(overrides={
        "DATASET_PATH": vqa_layout["DATASET_PATH"], "FEATURE_PATH": vqa_layout["FEATURE_PATH"],
        "IMG_FEAT_SIZE": 12, "LAYER": 1, "HIDDEN_SIZE": 16, "MULTI_HEAD": 2, "FF_SIZE": 32,
        "FLAT_MLP_SIZE": 16, "FLAT_OUT_SIZE": 32, "WORD_EMBED_SIZE": 16, "BATCH_SIZE": 10,
        "MAX_EPOCH": 1, "LR_BASE": 1e-30, "EVAL_EVERY_EPOCH": False, "VERBOSE": False, "NUM_THREADS": 2,
        "DEVICE": "cpu", "USE_GLOVE": True, "WORD_VECTORS": str(glove),
        "ANSWER_DICT_PATH": str(tmp_path / "answers.json"),
        "CKPTS_PATH": str(tmp_path / "ckpts"), "RESULT_PATH": str(tmp_path / "results")})
    train(cfg)
    state = load_checkpoint(tmp_path / "ckpts/ckpt_0/epoch1.pkl")
    embedding = state["state_dict"]["embedding.weight"].numpy()
    token_to_ix = state["token_to_ix"]
    # the generated first question is "What color is the cat?": tokens in first-seen order
    assert list(token_to_ix)[:6] == ["PAD", "UNK", "what", "color", "is", "the"]
    assert len(token_to_ix) == embedding.shape[0]
    for word, ix in token_to_ix.items():
        expected = file_vectors.get(word, np.zeros(16))
        np.testing.assert_allclose(embedding[ix], expected, rtol=0, atol=1e-6, err_msg=word)
