"""Write a synthetic data tree shaped like VQA v2 with bottom-up-attention features (VQA v2 itself
cannot be downloaded on this project's machines).

    .venv/bin/python benchmarks/make_vqa_tree.py --images 2000 --out /tmp/vqa_tree [--questions-per-image 5]
        [--val-images N/4] [--test-images 0] [--seed 0] [--workers CPUs] [--overwrite]

It writes, under --out:

    vqa/                      DATASET_PATH
      v2_OpenEnded_mscoco_{train2014,val2014[,test2015]}_questions.json
      v2_mscoco_{train2014,val2014}_annotations.json
    coco_extract/             FEATURE_PATH
      {train2014,val2014[,test2015]}/COCO_<folder>_<12-digit image id>.jpg.npz
    token_dict.json           TOKEN_DICT_PATH: {token: id}, 20,573 entries (PAD 0, UNK 1, words)
    answer_dict.json          ANSWER_DICT_PATH: mcan-vqa's [ans_to_ix, ix_to_ans], 3,129 answers

and prints the accuvqa overrides that read it. The sizes are real where they matter for speed:
each feature file is written as the bottom-up-attention extraction writes it, one
`np.savez_compressed` with `x` float32 (2048, N), `bbox` float32 (N, 4), `num_bbox` N,
`image_h`, `image_w`, N drawn uniformly from 10 to 100 regions. The features are |normal| * 0.5
(non-negative, like pooled ReLU outputs), so they compress about as poorly as real ones. The two
dictionaries have MCAN-small's sizes (20,573 tokens, 3,129 answers), so the model built on this
tree has MCAN-small's embedding and classifier shapes. Questions have 4 to 14 words drawn from the
token dictionary (Zipf-like frequencies), with a question mark; every question has ten annotator
answers, mostly agreeing, drawn from the answer dictionary.

The dictionaries do not depend on --seed; questions, answers and features do, and every image's
file depends only on (--seed, folder, image id): the number of workers changes nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from accuvqa.data.vocab import prep_answer, tokenize

N_TOKENS = 20_573  # MCAN-small's token dictionary size (PAD, UNK and 20,571 words)
N_ANSWERS = 3_129  # mcan-vqa's answer_dict.json
FEAT_SIZE = 2048
MIN_REGIONS, MAX_REGIONS = 10, 100
MIN_WORDS, MAX_WORDS = 4, 14
FOLDER_CODE = {"train2014": 1, "val2014": 2, "test2015": 3}

# a few real words first, so that questions read like questions; the rest are made-up words
STARTERS = {  # first words -> answer type
    "what": "other", "what color": "other", "which": "other", "where": "other", "who": "other",
    "why": "other", "what is the": "other", "how many": "number", "what number": "number",
    "is": "yes/no", "are": "yes/no", "does": "yes/no", "do": "yes/no", "can": "yes/no",
    "is there": "yes/no", "is the": "yes/no",
}
REAL_WORDS = ("what is the color how many are there a of this in on does do can which where who why "
              "number man woman person people picture photo table room street dog cat car bus train "
              "shirt wearing holding sitting standing left right front back top bottom").split()
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["qua", "sha", "tho", "chi", "ble"]


def make_words(n: int, gen: np.random.Generator, taken: set[str]) -> list[str]:
    """`n` distinct made-up lower-case words (2 to 4 syllables), none in `taken`."""
    words: list[str] = []
    seen = set(taken)
    while len(words) < n:
        word = "".join(gen.choice(SYLLABLES, size=int(gen.integers(2, 5))))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def make_dictionaries() -> tuple[dict[str, int], list[str], list[str], list[str]]:
    """Token dictionary {token: id}, and the answers of each answer type (all answers in dictionary order)."""
    gen = np.random.default_rng(20_573)  # fixed: the dictionaries do not depend on --seed
    words = list(dict.fromkeys(REAL_WORDS))
    words += make_words(N_TOKENS - 2 - len(words), gen, set(words) | {"pad", "unk"})
    token_to_ix = {"PAD": 0, "UNK": 1, **{w: i + 2 for i, w in enumerate(words)}}
    numbers = [str(i) for i in range(0, 51)]
    yes_no = ["yes", "no"]
    other: list[str] = []
    pool = words[len(REAL_WORDS):]
    for i, word in enumerate(pool):  # one- and two-word answers that mcan-vqa's normalisation keeps as they are
        answer = word if i % 5 else f"{word} {pool[-1 - i]}"
        if prep_answer(answer) == answer and answer not in other:
            other.append(answer)
        if len(yes_no) + len(numbers) + len(other) == N_ANSWERS:
            break
    return token_to_ix, yes_no, numbers, other


def zipf_weights(n: int, s: float = 1.05) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def make_questions(folder: str, image_ids: np.ndarray, per_image: int, seed: int, words: list[str],
                   answers: dict[str, list[str]], annotate: bool) -> tuple[list[dict], list[dict]]:
    """Question and annotation dicts for the images of one folder, in the VQA v2 JSON format."""
    gen = np.random.default_rng([seed, FOLDER_CODE[folder], 0])
    lengths = np.arange(MIN_WORDS, MAX_WORDS + 1)
    length_p = np.exp(-(lengths - MIN_WORDS) / 2.5)
    length_p /= length_p.sum()
    word_p = zipf_weights(len(words))
    answer_p = {kind: zipf_weights(len(a), 1.2) for kind, a in answers.items()}
    starters = list(STARTERS)
    n = len(image_ids) * per_image
    n_words = gen.choice(lengths, size=n, p=length_p)
    starter = gen.integers(0, len(starters), size=n)
    body = gen.choice(len(words), size=int(n_words.sum()), p=word_p)
    questions, annotations = [], []
    pos = 0
    for q in range(n):
        image_id = int(image_ids[q // per_image])
        question_id = image_id * 1000 + q % per_image  # VQA v2's numbering
        first = starters[starter[q]]
        k = int(n_words[q]) - len(first.split())
        text = " ".join([first] + [words[j] for j in body[pos: pos + k]]) + "?"
        pos += k
        questions.append({"image_id": image_id, "question": text[0].upper() + text[1:], "question_id": question_id})
        if not annotate:
            continue
        kind = STARTERS[first]
        pool, p = answers[kind], answer_p[kind]
        main = pool[gen.choice(len(pool), p=p)]
        agree = int(gen.choice([10, 9, 8, 7, 6, 5, 4], p=[0.35, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05]))
        given = [main] * agree + [pool[j] for j in gen.choice(len(pool), size=10 - agree, p=p)]
        gen.shuffle(given)
        confidence = gen.choice(["yes", "maybe", "no"], size=10, p=[0.85, 0.1, 0.05])
        annotations.append({
            "question_id": question_id, "image_id": image_id,
            "question_type": " ".join(tokenize(text)[:3]) if kind != "yes/no" else first,
            "answer_type": kind,
            "multiple_choice_answer": Counter(given).most_common(1)[0][0],
            "answers": [{"answer": a, "answer_confidence": str(c), "answer_id": i + 1}
                        for i, (a, c) in enumerate(zip(given, confidence))],
        })
    return questions, annotations


def write_image(task: tuple[str, str, int, int]) -> int:
    """Write one image's features as the bottom-up-attention extraction does; return the file's size."""
    path, folder, image_id, seed = task
    gen = np.random.default_rng([seed, FOLDER_CODE[folder], image_id])
    n = int(gen.integers(MIN_REGIONS, MAX_REGIONS + 1))
    h, w = int(gen.integers(240, 641)), int(gen.integers(240, 641))
    x = np.abs(gen.standard_normal((FEAT_SIZE, n), dtype=np.float32)) * np.float32(0.5)
    x0 = gen.uniform(0, w - 16, n)
    y0 = gen.uniform(0, h - 16, n)
    x1 = np.minimum(x0 + gen.uniform(16, w, n), w - 1)
    y1 = np.minimum(y0 + gen.uniform(16, h, n), h - 1)
    bbox = np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)
    np.savez_compressed(path, x=x, bbox=bbox, num_bbox=n, image_h=h, image_w=w)
    return os.path.getsize(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, required=True, help="train2014 images")
    parser.add_argument("--questions-per-image", type=int, default=5)
    parser.add_argument("--val-images", type=int, default=None, help="val2014 images (default: images // 4)")
    parser.add_argument("--test-images", type=int, default=0, help="test2015 images, questions only (default 0)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--overwrite", action="store_true", help="replace a tree already at --out")
    args = parser.parse_args()
    if args.images <= 0 or args.questions_per_image <= 0:
        parser.error("--images and --questions-per-image must be positive")
    sizes = {"train2014": args.images,
             "val2014": args.images // 4 if args.val_images is None else args.val_images,
             "test2015": args.test_images}
    sizes = {folder: n for folder, n in sizes.items() if n > 0}

    out = args.out.resolve()
    dataset_path, feature_path = out / "vqa", out / "coco_extract"
    token_path, answer_path = out / "token_dict.json", out / "answer_dict.json"
    if dataset_path.exists() or feature_path.exists():
        if not args.overwrite:
            print(f"{out} already holds a tree (vqa/ or coco_extract/); add --overwrite to replace it", file=sys.stderr)
            return 2
        shutil.rmtree(dataset_path, ignore_errors=True)
        shutil.rmtree(feature_path, ignore_errors=True)
    dataset_path.mkdir(parents=True)
    start = time.perf_counter()

    token_to_ix, yes_no, numbers, other = make_dictionaries()
    ans_list = yes_no + numbers + other
    ans_to_ix = {a: i for i, a in enumerate(ans_list)}
    token_path.write_text(json.dumps(token_to_ix))
    answer_path.write_text(json.dumps([ans_to_ix, {str(i): a for a, i in ans_to_ix.items()}]))
    words = [w for w in token_to_ix if w not in ("PAD", "UNK")]

    # COCO-like image ids, distinct over all folders (COCO's train, val and test ids are disjoint)
    gen = np.random.default_rng([args.seed, 0, 0])
    total = sum(sizes.values())
    all_ids = gen.choice(max(1_000_000, 2 * total), size=total, replace=False) + 1
    image_ids, used = {}, 0
    for folder, n in sizes.items():
        image_ids[folder] = np.sort(all_ids[used: used + n])
        used += n

    n_questions = {}
    for folder, ids in image_ids.items():
        annotate = folder != "test2015"
        questions, annotations = make_questions(folder, ids, args.questions_per_image, args.seed, words,
                                                {"yes/no": yes_no, "number": numbers, "other": other}, annotate)
        n_questions[folder] = len(questions)
        info = {"license": {"name": "synthetic"}, "data_subtype": folder, "data_type": "mscoco"}
        (dataset_path / f"v2_OpenEnded_mscoco_{folder}_questions.json").write_text(
            json.dumps({**info, "task_type": "Open-Ended", "questions": questions}))
        if annotate:
            (dataset_path / f"v2_mscoco_{folder}_annotations.json").write_text(
                json.dumps({**info, "annotations": annotations}))
    json_s = time.perf_counter() - start

    tasks = []
    for folder, ids in image_ids.items():
        (feature_path / folder).mkdir(parents=True)
        tasks += [(str(feature_path / folder / f"COCO_{folder}_{int(i):012d}.jpg.npz"), folder, int(i), args.seed)
                  for i in ids]
    feat_start = time.perf_counter()
    with multiprocessing.Pool(args.workers) as pool:
        file_bytes = sum(pool.imap_unordered(write_image, tasks, chunksize=8))
    feat_s = time.perf_counter() - feat_start
    disk_bytes = sum(os.stat(t[0]).st_blocks * 512 for t in tasks)

    n_img = len(tasks)
    print(f"wrote {out}: " + ", ".join(f"{folder} {n} images / {n_questions[folder]} questions"
                                       for folder, n in sizes.items()))
    print(f"dictionaries: {len(token_to_ix)} tokens, {len(ans_to_ix)} answers")
    print(f"time: {time.perf_counter() - start:.1f} s in all (JSON and dictionaries {json_s:.1f} s, "
          f"{n_img} feature files {feat_s:.1f} s with {args.workers} workers = {n_img / feat_s:.0f} images/s; "
          f"load average {os.getloadavg()[0]:.2f})")
    print(f"features: {file_bytes / n_img / 1024:.0f} KiB per image on average "
          f"({disk_bytes / n_img / 1024:.0f} KiB of disk blocks), {disk_bytes / 2**30:.2f} GiB in all")
    overrides = (f"--DATASET vqa --DATASET_PATH {dataset_path} --FEATURE_PATH {feature_path} "
                 f"--TOKEN_DICT_PATH {token_path} --ANSWER_DICT_PATH {answer_path}")
    print("accuvqa overrides:")
    print(f"  {overrides}")
    print("check the tree:")
    print(f"  .venv/bin/accuvqa prepare --config small {overrides}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
