"""Time to the first update and question/answer memory of `accuvqa train` at VQA v2's size: a run that
finds the question store current against a run that builds it first (from the JSON), in the same tree.

    .venv/bin/python benchmarks/first_update.py --tree /tmp/qa_tree [--images 82783] [--runs 2]
        [--updates 10] [--workers 2] [--config small]

With no tree at --tree it writes one: a train split of --images COCO-like images with 5 questions
each (82,783 images: VQA v2's 413,915 train questions), questions and ten annotator answers drawn
as `make_vqa_tree.py` draws them, and tiny features (IMG_FEAT_SIZE 8, 10 to 20 regions, written
with `np.savez`) so that the tree is quick to write and the features cost next to nothing: what is
measured is the question side. It runs `accuvqa prepare` (tree check, question store, packed features;
its time is printed), then `accuvqa train` in a fresh process per run, alternating the two cases --runs
times each:
- `built`: the `train.qa` store moved aside, so that the run builds it from the JSON first, as
  `accuvqa train` on a freshly written tree does (the commands read only the stores: there is no
  JSON reader to compare with any more); the store it built is deleted and the prepared one put back
  after the run (also after an error; a run killed in between leaves `train.qa.aside`, which the next
  run puts back);
- `store`: the prepared store, current, read as it is.
The packed feature store is current in both. NUM_WORKERS --workers, dictionaries built from the data
(no TOKEN_DICT_PATH / ANSWER_DICT_PATH), BATCH_SIZE 64, --config's keys with a tiny MCAN (1 layer,
hidden size 64; --full-model keeps the config's sizes).

Each run reports:
- seconds from starting the process to the end of the first update (interpreter and imports included);
- where they go: start-up (interpreter, imports, runtime set-up), data (from the end of the runtime
  set-up to the model being built: the question store (built first in `built`), dictionaries,
  dataset), model and first update (building the model and optimizer, starting the workers, the first
  batch and update);
- question/answer memory: peak RSS when the model is about to be built, minus the RSS before the
  data is read; and the peak RSS of the process at that point;
- each loader worker's private memory (USS: Private_Clean + Private_Dirty of smaps_rollup) after
  the first update and after --updates updates: what a worker copied of the main process.
Last, what scoring the split from the arrays costs (`scoring_cost`); --runs 0 measures only that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FEAT_SIZE = 8
# a tiny MCAN by default: the model's own start-up and first step are not what is measured
TINY = ["--LAYER", "1", "--HIDDEN_SIZE", "64", "--MULTI_HEAD", "4", "--FF_SIZE", "128", "--FLAT_MLP_SIZE", "64",
        "--FLAT_OUT_SIZE", "128", "--WORD_EMBED_SIZE", "64"]

# runs inside the fresh `accuvqa train` process: measure at the three moments, then stop
CHILD = r"""
import json, os, sys, time
t_spawn = float(os.environ["FIRST_UPDATE_SPAWN"])
updates = int(os.environ["FIRST_UPDATE_UPDATES"])

def status(pid="self"):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out

def uss(pid):
    out = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean", "Private_Dirty")):
                out += int(line.split()[1]) * 1024
    return out

def workers():
    pids = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return {p: uss(p) for p in pids}

import accuvqa.train as train_module
from accuvqa.accumulate import GradientAccumulator
from accuvqa.cli import run

report = {}
setup_runtime, build_model, step = train_module.setup_runtime, train_module.build_model, GradientAccumulator.step

def on_setup(cfg):
    rt = setup_runtime(cfg)
    report["rss_before_data"] = status()["VmRSS"]
    report["t_data"] = time.time()
    report["startup_s"] = report["t_data"] - t_spawn
    return rt

def on_build(*args, **kwargs):
    s = status()
    report.update(data_s=time.time() - report.pop("t_data"), peak_at_model=s["VmHWM"], rss_at_model=s["VmRSS"],
                  t_model=time.time())
    return build_model(*args, **kwargs)

def on_step(self, *args, **kwargs):
    out = step(self, *args, **kwargs)
    report["n"] = report.get("n", 0) + 1
    if report["n"] == 1:
        report.update(first_update_s=time.time() - t_spawn, model_to_update_s=time.time() - report.pop("t_model"),
                      peak_at_first_update=status()["VmHWM"],
                      workers_first=workers())
    if report["n"] == updates:
        report.update(workers_last=workers(), rss_last=status()["VmRSS"])
        print("FIRST_UPDATE " + json.dumps(report), flush=True)
        os._exit(0)
    return out

train_module.setup_runtime, train_module.build_model, GradientAccumulator.step = on_setup, on_build, on_step
sys.exit(run(sys.argv[1:]))
"""


def write_tree(out: Path, images: int, seed: int = 0) -> None:
    """The JSON of a VQA v2-sized train split (questions as make_vqa_tree.py draws them) and tiny features."""
    sys.path.insert(0, str(HERE))
    import make_vqa_tree as tree

    token_to_ix, yes_no, numbers, other = tree.make_dictionaries()
    words = [w for w in token_to_ix if w not in ("PAD", "UNK")]
    gen = np.random.default_rng([seed, 0, 0])
    image_ids = np.sort(gen.choice(max(1_000_000, 2 * images), size=images, replace=False) + 1)
    questions, annotations = tree.make_questions("train2014", image_ids, 5, seed, words,
                                                 {"yes/no": yes_no, "number": numbers, "other": other}, True)
    dataset_path, folder = out / "vqa", out / "coco_extract" / "train2014"
    dataset_path.mkdir(parents=True)
    folder.mkdir(parents=True)
    info = {"license": {"name": "synthetic"}, "data_subtype": "train2014", "data_type": "mscoco"}
    (dataset_path / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(
        json.dumps({**info, "task_type": "Open-Ended", "questions": questions}))
    (dataset_path / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({**info, "annotations": annotations}))
    for image_id in image_ids.tolist():
        n = int(gen.integers(10, 21))
        np.savez(folder / f"COCO_train2014_{image_id:012d}.jpg.npz", x=gen.random((FEAT_SIZE, n), dtype=np.float32),
                 bbox=np.zeros((n, 4), np.float32), num_bbox=n, image_h=480, image_w=640)


def scoring_cost(dataset_path: Path, config: str) -> str:
    """What scoring a split from the arrays costs: the annotators' answers' share of the split file (held
    with the arrays), and the time and memory to decode them into `metrics.evaluate`'s table (done only
    when scoring)."""
    from accuvqa.config import load_config
    from accuvqa.data.question_store import question_store

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    cfg = load_config(config, {"DATASET_PATH": str(dataset_path), "VERBOSE": False})
    store = question_store(cfg)
    arrays = store.questions(cfg.TRAIN_SPLIT, need_answers=True)
    with np.load(store.path / f"{cfg.TRAIN_SPLIT}.npz") as z:
        sizes = {k: z[k].nbytes for k in z.files}
    gt = sum(v for k, v in sizes.items() if k.startswith("gt_"))
    before, start = rss(), time.perf_counter()
    table = arrays.scoring_table()
    seconds, grown = time.perf_counter() - start, rss() - before
    return (f"{len(table)} questions: arrays {(sum(sizes.values()) - gt) / 2**20:.1f} MiB, annotators' answers "
            f"{gt / 2**20:.1f} MiB in the split file (held with the arrays, decoded only when scoring); decoding "
            f"them into the scoring table: {seconds:.2f} s, +{grown / 2**20:.0f} MiB RSS while it is held")


def accuvqa(*args: str) -> list[str]:
    return [sys.executable, "-m", "accuvqa", *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True)
    parser.add_argument("--images", type=int, default=82_783, help="train images, 5 questions each (when writing)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each case (built, store), alternating")
    parser.add_argument("--updates", type=int, default=10, help="updates before the workers are measured again")
    parser.add_argument("--workers", type=int, default=2, help="NUM_WORKERS")
    parser.add_argument("--config", default="small")
    parser.add_argument("--full-model", action="store_true", help="the config's own model sizes, not a tiny MCAN")
    args = parser.parse_args()
    tree = args.tree.resolve()
    if not (tree / "vqa").is_dir():
        start = time.perf_counter()
        write_tree(tree, args.images)
        print(f"wrote {tree} in {time.perf_counter() - start:.1f} s")
    overrides = ["--config", args.config, "--DATASET", "vqa", "--DATASET_PATH", str(tree / "vqa"),
                 "--FEATURE_PATH", str(tree / "coco_extract"), "--IMG_FEAT_SIZE", str(FEAT_SIZE), "--VERBOSE", "False"]
    store = tree / "vqa" / "train.qa"
    aside = store.with_name("train.qa.aside")
    if aside.exists():  # left by a run killed while the store was aside
        shutil.rmtree(store, ignore_errors=True)
        aside.rename(store)
        print(f"note: put back {store}, left aside by an interrupted run")
    start = time.perf_counter()
    subprocess.run(accuvqa("prepare", *overrides), check=True, stdout=subprocess.DEVNULL)
    print(f"accuvqa prepare: {time.perf_counter() - start:.1f} s (nothing to do when the tree was prepared before)")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"first_update_{os.getpid()}"
    results: dict[str, list[dict]] = {"built": [], "store": []}
    try:
        for run in range(args.runs):
            for case in ("built", "store"):
                if case == "built":
                    store.rename(aside)
                try:
                    env = {**os.environ, "FIRST_UPDATE_SPAWN": repr(time.time()),
                           "FIRST_UPDATE_UPDATES": str(args.updates), "PYTHONPATH": str(ROOT / "src")}
                    proc = subprocess.run(
                        [sys.executable, "-c", CHILD, "train", *overrides, "--NUM_WORKERS", str(args.workers),
                         *([] if args.full_model else TINY),
                         "--EVAL_EVERY_EPOCH", "False", "--BATCH_SIZE", "64", "--VERSION", f"{case}{run}",
                         "--CKPTS_PATH", str(work / "ck"), "--RESULT_PATH", str(work / "res")],
                        env=env, capture_output=True, text=True)
                finally:
                    if case == "built":
                        shutil.rmtree(store, ignore_errors=True)  # the one this run built
                        aside.rename(store)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("FIRST_UPDATE ")), None)
                if line is None:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    return 1
                r = json.loads(line.split(" ", 1)[1])
                results[case].append(r)
                mib = 2**20
                print(f"run {run + 1} {case:6}: first update {r['first_update_s']:.2f} s (start-up {r['startup_s']:.2f} "
                      f"s, data {r['data_s']:.2f} s, model and first update {r['model_to_update_s']:.2f} s), "
                      f"question/answer memory {(r['peak_at_model'] - r['rss_before_data']) / mib:.0f} MiB (held "
                      f"{(r['rss_at_model'] - r['rss_before_data']) / mib:.0f}), peak RSS {r['peak_at_model'] / mib:.0f} "
                      f"MiB at the model, {r['peak_at_first_update'] / mib:.0f} MiB at the first update; workers' USS "
                      f"after update 1: {', '.join(f'{v / mib:.0f}' for v in r['workers_first'].values())} MiB, after "
                      f"update {args.updates}: {', '.join(f'{v / mib:.0f}' for v in r['workers_last'].values())} MiB",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("scoring from the arrays:", scoring_cost(tree / "vqa", args.config))
    if not args.runs:
        return 0
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("first_update_s", "data_s")}
           for k, v in results.items()}
    qa = {k: statistics.median((r["peak_at_model"] - r["rss_before_data"]) / 2**20 for r in v)
          for k, v in results.items()}
    built, current = med["built"], med["store"]
    print(f"median first update: building the store {built['first_update_s']:.2f} s, store current "
          f"{current['first_update_s']:.2f} s ({built['first_update_s'] / current['first_update_s']:.1f}x); data: "
          f"built {built['data_s']:.2f} s, current {current['data_s']:.2f} s; question/answer memory: built "
          f"{qa['built']:.0f} MiB, current {qa['store']:.0f} MiB; load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
