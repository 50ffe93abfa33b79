"""Prototype training on the bundled CLEVR-style reasoning set: generate it, train MCAN through accuvqa's own
recipe (loss, optimizer, MCAN's warm-up and decays, GradientAccumulator), score the test split per family.

    .venv/bin/python benchmarks/reasoning_prototype.py --threads 1 --minutes 10 --json out.json
    .venv/bin/python benchmarks/reasoning_prototype.py --set HIDDEN_SIZE=128 BATCH_SIZE=64 LR_BASE=0.001

The defaults are configs/clevr_shapes.yml's keys and data (1500 train images, 250 test images, generated once and
cached under --data). Prints one line per epoch (train seconds so far, test accuracy overall and per family
group as clevr_metrics.FAMILIES and `accuvqa val` group them: equal_integer under Compare_Attribute) and a final
per-family table; `--json FILE` writes the same as JSON. Training time excludes the per-epoch scoring; batches
are trimmed to their longest question, as accuvqa's loader does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from accuvqa.accumulate import GradientAccumulator
from accuvqa.clevr_metrics import FAMILIES as GROUPS
from accuvqa.config import load_config
from accuvqa.data import scenes
from accuvqa.data.vocab import build_token_dict, encode_question
from accuvqa.models import build_model
from accuvqa.recipe import lr_at, make_loss_fn, make_optimizer

PRESET = Path(__file__).resolve().parent.parent / "src" / "accuvqa" / "configs" / "clevr_shapes.yml"
PLACES = ("DATASET", "DATASET_PATH", "FEATURE_PATH", "CKPTS_PATH", "RESULT_PATH", "TRAIN_SPLIT", "PRELOAD",
          "SCENE_IMAGES", "NUM_THREADS")  # where the preset's data and runs live: the prototype keeps its own


def preset_keys() -> dict:
    """The preset's model and training keys (configs/clevr_shapes.yml), the prototype's defaults."""
    import yaml

    return {k: v for k, v in yaml.safe_load(PRESET.read_text()).items() if k not in PLACES}


def parse_value(text: str):
    """A --set value as YAML would read it (int, float, list, bool, str)."""
    import yaml

    return yaml.safe_load(text)


def dataset(root: Path, images: dict[str, int], seed: int, image_size: int, qpi: int,
            train_mix: dict[str, int] | None = None) -> Path:
    """Generate the set once per setting (cached under `root`; the tag names the generator's design)."""
    train_mix = scenes.TRAIN_MIX if train_mix is None else train_mix
    mix = "".join(str(train_mix.get(f, 1)) for f in scenes.FAMILIES)
    tag = (f"s{seed}_i{image_size}_q{qpi}_c{scenes.MAX_COUNT}_m{mix}_"
           + "_".join(f"{k}{v}" for k, v in images.items()))
    out = root / tag
    if not (out / "done.json").is_file():
        t = time.perf_counter()
        summary = scenes.generate(out, images, seed=seed, image_size=image_size, questions_per_image=qpi,
                                  train_mix=train_mix)
        summary["seconds"] = time.perf_counter() - t
        (out / "done.json").write_text(json.dumps(summary, indent=1))
        print(f"generated {out} in {summary['seconds']:.0f} s", flush=True)
    return out


def load_features(root: Path, split: str, n: int, kind: str, pad: int) -> np.ndarray:
    """(n_images, pad, D) float32: object features read from the .npz files, or grid features from the PNGs."""
    if kind == "object":
        rows = []
        for i in range(n):
            with np.load(root / "feats" / split / f"{i}.npz") as z:
                rows.append(z["x"].T)
        d = rows[0].shape[1]
    else:
        from PIL import Image

        cells = int(kind[len("grid"):] or 8)
        rows = []
        for i in range(n):
            rgb = np.asarray(Image.open(root / "images" / split / scenes.image_filename(split, i)).convert("RGB"))
            rows.append(scenes.grid_features(rgb, cells)[0].T)
        d = rows[0].shape[1]
    out = np.zeros((n, pad, d), dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, :min(len(r), pad)] = r[:pad]
    return out


def encode(questions: list[dict], token_to_ix: dict, ans_to_ix: dict, max_token: int):
    """Question ids (Q, T), answer ids (Q,), image index (Q,), family names."""
    q = np.stack([encode_question(x["question"], token_to_ix, max_token) for x in questions])
    a = np.array([ans_to_ix.get(x["answer"], -1) for x in questions])
    img = np.array([x["image_index"] for x in questions])
    fam = [scenes.family_of(x["program"]) for x in questions]
    return q, a, img, fam


GROUP_OF = {function: group for group, functions in GROUPS.items() for function in functions}


def score(model, feats, q, a, img, fam, batch: int = 512) -> dict:
    """Accuracy (percent) overall, per openvqa group (clevr_metrics.FAMILIES, as `accuvqa val` reports) and per
    family (the program's last function)."""
    model.eval()
    pred = []
    with torch.no_grad():
        for s in range(0, len(q), batch):
            logits = model(torch.from_numpy(feats[img[s:s + batch]]), torch.from_numpy(q[s:s + batch]))
            pred.append(logits.argmax(1).numpy())
    model.train()
    ok = np.concatenate(pred) == a
    by_fam, by_group = defaultdict(list), defaultdict(list)
    for k, f in zip(ok, fam):
        by_fam[f].append(k)
        by_group[GROUP_OF[f]].append(k)
    return {"overall": 100 * ok.mean(), "groups": {g: 100 * np.mean(v) for g, v in sorted(by_group.items())},
            "families": {f: 100 * np.mean(v) for f, v in sorted(by_fam.items())}}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/accuvqa_reasoning"))
    p.add_argument("--train-images", type=int, default=1500)
    p.add_argument("--test-images", type=int, default=250)
    p.add_argument("--questions-per-image", type=int, default=scenes.QUESTIONS_PER_IMAGE)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--use-images", type=int, default=0,
                   help="train on the first N train images only (0: all); the generator writes a set's images and "
                        "questions in order, so this is the set that --train-images N would write")
    p.add_argument("--keep-questions", type=int, default=0,
                   help="train on the first K questions of each image only (0: all): shorter epochs, same images")
    p.add_argument("--train-mix", default=None,
                   help="train's family weights: 'uniform' or family=weight,... (default scenes.TRAIN_MIX)")
    p.add_argument("--families", default="",
                   help="train and test on these families only, e.g. count,equal_integer (default all)")
    p.add_argument("--features", default="object", help="object, or gridN (N x N cells)")
    p.add_argument("--feature-rows", default="",
                   help="keep only these feature rows, e.g. 0-15,40-41,47 (others zeroed; default all)")
    p.add_argument("--minutes", type=float, default=10.0, help="training-time budget (stops after the epoch past it)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config keys over the preset's")
    p.add_argument("--unset", nargs="*", default=[], metavar="KEY",
                   help="drop these preset keys (another MODEL_USE's keys, e.g. LAYER FF_SIZE for ban)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    mix = None if args.train_mix is None else {} if args.train_mix == "uniform" else {
        f: int(w) for f, w in (part.split("=") for part in args.train_mix.split(","))}
    root = dataset(args.data, {"train": args.train_images, "test": args.test_images}, args.data_seed,
                   args.image_size, args.questions_per_image, mix)
    keys = preset_keys()
    keys.update({k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)})
    for key in args.unset:
        keys.pop(key, None)
    train_q, _ = scenes.load_split(root, "train")
    test_q, _ = scenes.load_split(root, "test")
    if args.families:
        keep_families = set(args.families.split(","))
        train_q = [q for q in train_q if scenes.family_of(q["program"]) in keep_families]
        test_q = [q for q in test_q if scenes.family_of(q["program"]) in keep_families]
    if args.use_images:
        train_q = [q for q in train_q if q["image_index"] < args.use_images]
    if args.keep_questions:
        seen: dict[int, int] = defaultdict(int)
        kept = []
        for q in train_q:
            seen[q["image_index"]] += 1
            if seen[q["image_index"]] <= args.keep_questions:
                kept.append(q)
        train_q = kept
    pad = 11 if args.features == "object" else int(args.features[len("grid"):] or 8) ** 2
    t0 = time.perf_counter()
    train_f = load_features(root, "train", args.train_images, args.features, pad)
    test_f = load_features(root, "test", args.test_images, args.features, pad)
    if args.feature_rows:
        keep = np.zeros(train_f.shape[2], dtype=bool)
        for part in args.feature_rows.split(","):
            lo, _, hi = part.partition("-")
            keep[int(lo):int(hi or lo) + 1] = True
        train_f[..., ~keep] = 0.0
        test_f[..., ~keep] = 0.0
    print(f"features {args.features}: {train_f.shape} in {time.perf_counter() - t0:.0f} s", flush=True)
    keys.update({"IMG_FEAT_SIZE": train_f.shape[2], "IMG_FEAT_PAD_SIZE": pad})
    cfg = load_config(None, keys)
    torch.manual_seed(cfg.SEED)

    token_to_ix = build_token_dict(x["question"] for x in train_q)
    answers = sorted({x["answer"] for x in train_q})
    ans_to_ix = {a: i for i, a in enumerate(answers)}
    tr = encode(train_q, token_to_ix, ans_to_ix, cfg.MAX_TOKEN)
    te = encode(test_q, token_to_ix, ans_to_ix, cfg.MAX_TOKEN)
    model = build_model(cfg, len(token_to_ix), len(ans_to_ix))
    accumulator = GradientAccumulator(model, make_optimizer(cfg, model), micro_batches=cfg.GRAD_ACCU_STEPS,
                                      reduction=cfg.LOSS_REDUCTION,
                                      max_grad_norm=cfg.GRAD_NORM_CLIP if cfg.GRAD_NORM_CLIP > 0 else None)
    loss_fn = make_loss_fn(cfg)
    n = len(tr[0])
    per_epoch = max(1, n // cfg.BATCH_SIZE)  # a set smaller than a batch trains as one batch
    print(f"train {n} questions, test {len(te[0])}; {len(answers)} answers, {len(token_to_ix)} tokens; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; keys {keys}", flush=True)
    gen = torch.Generator().manual_seed(cfg.SEED)
    step, train_s, history = 0, 0.0, []
    q_t, a_t, img_t = torch.from_numpy(tr[0]), torch.from_numpy(tr[1]), torch.from_numpy(tr[2])
    feats_t = torch.from_numpy(train_f)
    result = None
    for epoch in range(cfg.MAX_EPOCH):
        start = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        loss_sum = 0.0
        for b in range(per_epoch):
            idx = order[b * cfg.BATCH_SIZE:(b + 1) * cfg.BATCH_SIZE]
            step += 1
            lr = lr_at(cfg, step, epoch, n / cfg.BATCH_SIZE)
            for group in accumulator.optimizer.param_groups:
                group["lr"] = lr
            target = torch.zeros(len(idx), len(answers))
            target[torch.arange(len(idx)), a_t[idx]] = 1.0
            ques = q_t[idx]
            ques = ques[:, :max(1, int((ques != 0).sum(1).max()))]  # dynamic padding, as accuvqa's loader
            batch = {"img_feat": feats_t[img_t[idx]], "ques_ix": ques, "answer_scores": target}
            loss_sum += float(accumulator.step(batch, loss_fn).loss)
        train_s += time.perf_counter() - start
        result = score(model, test_f, *te)
        history.append({"epoch": epoch + 1, "train_s": train_s, "loss": loss_sum / n, **result})
        print(f"epoch {epoch + 1}: {train_s:.0f} s, lr {lr:.2g}, loss {loss_sum / n:.4f}, test {result['overall']:.2f} ("
              + ", ".join(f"{g} {v:.1f}" for g, v in result["groups"].items()) + ")", flush=True)
        if args.json:  # after every epoch, so that a stopped run keeps what it measured
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "keys": keys,
                                             "history": history}, indent=1))
        if train_s > args.minutes * 60:
            break
    print(f"\ntest after {history[-1]['epoch']} epochs, {train_s:.0f} s of training ({args.threads} threads):")
    print(f"  overall {result['overall']:.2f}")
    base = json.loads((root / "done.json").read_text())["test"]["majority_baseline"]
    for f, v in result["families"].items():
        print(f"  {f:16s} {v:6.2f}   (majority baseline {base.get(f, 0):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
