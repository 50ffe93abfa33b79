"""Pretrained word vectors for the question embedding (`USE_GLOVE`), row for row as mcan-vqa.

mcan-vqa fills the embedding with `spacy_tool(word).vector` for every entry of the token
dictionary, 'PAD' and 'UNK' included (they are looked up as the literal strings "PAD" and "UNK"),
where `spacy_tool` is the `en_vectors_web_lg` package (GloVe Common Crawl vectors). `WORD_VECTORS`
names either

* a spaCy package or model folder with vectors (`en_vectors_web_lg` under spaCy 2,
  `en_core_web_lg` under spaCy 3): each row is `nlp.make_doc(word).vector`, the same value as
  mcan-vqa's `nlp(word).vector` (a Doc's vector is the mean of its tokens' vectors, zeros for
  a token without one; pipeline components do not change it when the package has vectors), or
* a GloVe text file (`word v1 v2 ... vD` per line, optionally gzip-compressed, optionally with a
  word2vec `count dim` header line): each row is the file's vector of that exact word (the first
  one when a word repeats), and zeros for a word the file lacks, which is what spaCy gives an
  out-of-vocabulary word. "PAD" and "UNK" are looked up like any other word, so they get zeros
  only when the file has no such line. Unlike spaCy, a file is never tokenised: a word that
  spaCy's tokenizer splits (e.g. "cant" -> "ca" + "nt") gets the mean of its pieces from spaCy
  but a whole-word lookup (usually zeros) from a file.
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from accuvqa.config import Config
from accuvqa.errors import DataError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "USE_GLOVE True needs word vectors: `pip install spacy` plus a spaCy package with vectors "
    "(mcan-vqa: en_vectors_web_lg 2.1.0 under spaCy 2; under spaCy 3: "
    "`python -m spacy download en_core_web_lg` and --WORD_VECTORS en_core_web_lg), "
    "or --WORD_VECTORS /path/to/glove.840B.300d.txt (a GloVe text file), or --USE_GLOVE False"
)
_FILE_SUFFIXES = (".txt", ".gz", ".vec")


def load_pretrained_embedding(cfg: Config, token_to_ix: Mapping[str, int]) -> np.ndarray:
    """(len(token_to_ix), WORD_EMBED_SIZE) float32 rows of WORD_VECTORS, in token-id order."""
    words = _words_by_id(token_to_ix)
    source = cfg.WORD_VECTORS
    path = Path(source).expanduser()
    if path.is_file():
        vectors = _glove_vectors(path, set(words), cfg.WORD_EMBED_SIZE)
        rows = np.zeros((len(words), cfg.WORD_EMBED_SIZE), dtype=np.float32)
        for ix, word in enumerate(words):
            if word in vectors:
                rows[ix] = vectors[word]
        log.info("word vectors: %d of %d tokens found in %s (the rest are zeros)",
                 sum(w in vectors for w in words), len(words), path)
        return rows
    if path.is_dir() or not _looks_like_a_path(source):
        return _spacy_vectors(source, words, cfg.WORD_EMBED_SIZE)
    raise DataError(f"WORD_VECTORS file {source} does not exist; {INSTALL_HINT}")


def _looks_like_a_path(source: str) -> bool:
    return os.sep in source or "/" in source or source.endswith(_FILE_SUFFIXES)


def _words_by_id(token_to_ix: Mapping[str, int]) -> list[str]:
    """Tokens ordered by id; the ids must be exactly 0..n-1."""
    words: list[str | None] = [None] * len(token_to_ix)
    for word, ix in token_to_ix.items():
        if not 0 <= ix < len(words) or words[ix] is not None:
            raise DataError(f"the token dictionary's ids are not 0..{len(words) - 1} (token {word!r} "
                            f"has id {ix}); rebuild it or fix TOKEN_DICT_PATH")
        words[ix] = word
    return words  # type: ignore[return-value]


def _glove_vectors(path: Path, wanted: set[str], size: int) -> dict[str, np.ndarray]:
    """The vectors of the `wanted` words in a GloVe text file, checking the vector size."""
    opener = gzip.open if path.suffix == ".gz" else open
    found: dict[str, np.ndarray] = {}
    dim_checked = False
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, start=1):
                line = line.rstrip("\r\n ")
                if not line:
                    continue
                if not dim_checked:
                    fields = line.split(" ")
                    header = len(fields) == 2 and all(x.isdigit() for x in fields)
                    dim = int(fields[1]) if header else len(fields) - 1
                    if dim != size:
                        raise DataError(
                            f"WORD_VECTORS file {path} has {dim}-dimensional vectors but WORD_EMBED_SIZE "
                            f"is {size}; set --WORD_EMBED_SIZE {dim} or use {size}-dimensional vectors")
                    dim_checked = True
                    if header:
                        continue
                word = line.partition(" ")[0]  # cheap test before splitting the whole line
                if word not in wanted or word in found:
                    continue
                fields = line.rsplit(" ", size)
                if len(fields) != size + 1 or fields[0] != word:
                    continue  # a word containing spaces, never one of our tokens
                try:
                    found[word] = np.asarray(fields[1:], dtype=np.float32)
                except ValueError:
                    raise DataError(f"{path} line {line_no}: expected a word and {size} numbers") from None
                if len(found) == len(wanted):
                    break
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read WORD_VECTORS file {path}: {e}") from e
    if not dim_checked:
        raise DataError(f"WORD_VECTORS file {path} holds no vectors; {INSTALL_HINT}")
    return found


def _spacy_vectors(name: str, words: Sequence[str], size: int) -> np.ndarray:
    """Rows `nlp.make_doc(word).vector` of the spaCy package or model folder `name`."""
    try:
        import spacy
    except ImportError:
        raise DataError(f"WORD_VECTORS {name!r} is read with spaCy, which is not installed; "
                        f"{INSTALL_HINT}") from None
    try:
        nlp = spacy.load(name)
    except (OSError, ImportError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"spaCy cannot load WORD_VECTORS {name!r} ({first}); {INSTALL_HINT}") from e
    width = int(nlp.vocab.vectors_length)
    if width == 0:
        raise DataError(f"the spaCy package {name!r} has no word vectors; {INSTALL_HINT}")
    if width != size:
        raise DataError(f"the spaCy package {name!r} has {width}-dimensional vectors but WORD_EMBED_SIZE "
                        f"is {size}; set --WORD_EMBED_SIZE {width}")
    rows = np.stack([np.asarray(nlp.make_doc(word).vector, dtype=np.float32) for word in words])
    log.info("word vectors: %d tokens from spaCy %s", len(words), name)
    return rows.reshape(len(words), size)
