"""Where an MCAN-small update's time goes, and what each speed lever changes, on VQA v2-shaped data.

    .venv/bin/python benchmarks/step_levers.py --tree /tmp/perf/tree16 [--batch-size 16] [--updates 6]
        [--levers profile bucket sdpa adam backward bf16 threads compile]

--tree: the --out of `benchmarks/make_vqa_tree.py`, prepared (the packed store is read). Batches
come from the real loader (`make_dataset`, `epoch_batches`, `dataset[indices]`) of the train split.

profile: `--updates` updates of MCAN-small (`configs/small.yml`, dropout on, Adam from
    `make_optimizer`), each timed in parts with forward hooks: loader (`dataset[indices]`),
    embedding + LSTM, image linear, SA x LAYER, SGA x LAYER, AttFlat (both), classifier
    (proj_norm + proj), loss, backward, optimizer step (zero_grad included). Median ms per part
    over the updates, and its share of the median update.
levers: two set-ups A and B, each on its own copy of the model (same initial weights), alternate
    update by update (who goes first alternates) on the same batches; a lever's ratio is
    median(B s/sample) / median(A s/sample): < 1 means B is faster.
    bucket: BUCKET_WINDOW 0 vs 16 (batches differ: time per sample over the same epoch positions)
    sdpa: MHAtt's explicit softmax path vs F.scaled_dot_product_attention (the default)
    adam: foreach Adam vs fused Adam (the default where torch has it, see `make_optimizer`)
    backward: LayerNorm and FC (linear, ReLU, dropout) through plain autograd on the original formulas
        vs their written-out backward passes (the default; `accuvqa.models.layers`)
    bf16: float32 vs AMP bf16 autocast
    threads: torch.set_num_threads(1) vs (2)
    compile: eager vs COMPILE (model.compile(dynamic=True)); the compile time is printed apart
    mcan-vqa (needs --mcan-vqa, a checkout of github.com/MILVLG/mcan-vqa whose `core/model/net.py`
        is imported from there): A = the original network's training step as its `core/exec.py`
        runs it (zero_grad, forward, BCELoss(reduction='sum') on the sigmoid output, backward, the
        loss read on the host, the per-parameter gradient norms it logs, Adam with its betas/eps)
        on the same questions padded as its loader pads them (100 regions, 14 tokens), the loader
        not timed; B = accuvqa's update with its loader: `dataset[indices]` of the bucketed batch
        (BUCKET_WINDOW --window) + `GradientAccumulator.step`, as `accuvqa train` runs it.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from accuvqa.accumulate import GradientAccumulator
from accuvqa.config import load_config
from accuvqa.data.loader import epoch_batches, make_dataset, sample_regions
from accuvqa.data.records import load_records
from accuvqa.data.vocab import build_vocab
from accuvqa.models import build_model
from accuvqa.models.layers import plain_autograd
from accuvqa.runtime import Runtime
from accuvqa.recipe import make_loss_fn, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("loader", "embedding + LSTM", "image linear", "SA (encoder)", "SGA (decoder)", "AttFlat", "classifier",
         "loss", "backward", "optimizer step")


def load(tree: Path, batch_size: int, window: int):
    """(config, dataset, the first epoch's batches) of the tree's train split."""
    cfg = load_config(ROOT / "configs/small.yml", {
        "DATASET": "vqa", "DATASET_PATH": str(tree / "vqa"), "FEATURE_PATH": str(tree / "coco_extract"),
        "TOKEN_DICT_PATH": str(tree / "token_dict.json"), "ANSWER_DICT_PATH": str(tree / "answer_dict.json"),
        "BATCH_SIZE": batch_size, "BUCKET_WINDOW": window, "VERBOSE": False})
    records = load_records(cfg, "train", need_answers=True)
    vocab = build_vocab(cfg, records)
    dataset = make_dataset(cfg, records, vocab)
    assert dataset.packed_store, "prepare the tree first (accuvqa prepare): the packed store is measured"
    batches = epoch_batches(len(dataset), cfg, 0, Runtime(torch.device("cpu")), sample_regions(dataset))
    return cfg, dataset, vocab, batches


def profile(cfg, dataset, vocab, batches, updates: int) -> None:
    """Median ms per part of an update (see the module docstring)."""
    torch.manual_seed(0)
    model = build_model(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix)).train()
    optimizer = make_optimizer(cfg, model)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    groups = {"embedding + LSTM": [model.embedding, model.lstm], "image linear": [model.img_feat_linear],
              "SA (encoder)": list(model.backbone.enc_list), "SGA (decoder)": list(model.backbone.dec_list),
              "AttFlat": [model.attflat_lang, model.attflat_img], "classifier": [model.proj_norm, model.proj]}
    spent: dict[str, float] = defaultdict(float)
    for name, modules in groups.items():
        for m in modules:
            m.register_forward_pre_hook(lambda mod, inp: setattr(mod, "_t0", time.perf_counter()))
            m.register_forward_hook(lambda mod, inp, out, name=name: spent.__setitem__(
                name, spent[name] + time.perf_counter() - mod._t0))
    rows = []
    for i in range(updates + 1):  # the first is a warm-up
        spent.clear()
        t = time.perf_counter()
        batch = dataset[batches[i % len(batches)]]
        spent["loader"] = time.perf_counter() - t
        t = time.perf_counter()
        logits = model(batch["img_feat"], batch["ques_ix"])
        forward = time.perf_counter() - t
        t = time.perf_counter()
        loss = loss_fn(logits, batch["answer_scores"], reduction="sum")
        spent["loss"] = time.perf_counter() - t
        t = time.perf_counter()
        loss.backward()
        spent["backward"] = time.perf_counter() - t
        t = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        spent["optimizer step"] = time.perf_counter() - t
        spent["forward, other"] = forward - sum(spent[g] for g in groups)
        if i:
            rows.append(dict(spent))
    total = statistics.median(sum(r.values()) for r in rows)
    print(f"\nprofile: batch {cfg.BATCH_SIZE}, {updates} updates, median update {total * 1e3:.0f} ms "
          f"({cfg.BATCH_SIZE / total:.2f} samples/s); regions per batch "
          f"{[int(dataset[b]['img_feat'].shape[1]) for b in batches[:updates + 1]]}")
    print(f"{'part':>18}  {'median ms':>9}  {'share':>6}")
    for part in (*PARTS, "forward, other"):
        ms = statistics.median(r[part] for r in rows) * 1e3
        print(f"{part:>18}  {ms:9.1f}  {ms / total / 10:5.1f}%")


def _setup(cfg, vocab, base_state, **kw):
    model = build_model(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix))
    model.load_state_dict(base_state)
    if kw.get("sdpa") is False:
        for m in model.modules():
            if hasattr(m, "use_sdpa"):
                m.use_sdpa = False
    if kw.get("formulas"):  # LayerNorm and FC through plain autograd, as before their written-out backward
        plain_autograd(model)
    opt_cfg = cfg.replace(OPT_PARAMS={"foreach": True}) if kw.get("foreach") else cfg  # default: fused
    compile_s = 0.0
    if kw.get("compile"):
        model.compile(dynamic=True)
    acc = GradientAccumulator(model, make_optimizer(opt_cfg, model), micro_batches=1,
                              autocast_dtype=torch.bfloat16 if kw.get("bf16") else None)
    return {"acc": acc, "threads": kw.get("threads", 2), "compile_s": compile_s}


LEVERS = {  # name: (A, B) set-up keywords, A first
    "sdpa": ({"sdpa": False}, {}),
    "adam": ({"foreach": True}, {}),
    "backward": ({"formulas": True}, {}),
    "bf16": ({}, {"bf16": True}),
    "threads": ({"threads": 1}, {"threads": 2}),
    "compile": ({}, {"compile": True}),
}


def lever(name, cfg, dataset, vocab, batches, updates: int, plain_batches=None) -> None:
    """Alternate set-ups A and B update by update; print their s/sample and the ratio B / A."""
    torch.manual_seed(0)
    base = build_model(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix)).state_dict()
    a_kw, b_kw = LEVERS.get(name, ({}, {}))
    setups = [_setup(cfg, vocab, copy.deepcopy(base), **a_kw), _setup(cfg, vocab, copy.deepcopy(base), **b_kw)]
    sources = [plain_batches or batches, batches]  # bucket: A reads unbucketed batches
    loss_fn = make_loss_fn(cfg)
    per_sample: list[list[float]] = [[], []]
    for i in range(updates + 1):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            s = setups[j]
            torch.set_num_threads(s["threads"])
            batch = dataset[sources[j][i % len(sources[j])]]
            batch = {k: v for k, v in batch.items() if k != "index"}
            t = time.perf_counter()
            s["acc"].step(batch, loss_fn)
            seconds = time.perf_counter() - t
            if i == 0:
                s["compile_s"] = seconds  # the warm-up update (compiles under COMPILE)
            else:
                per_sample[j].append(seconds / len(batch["ques_ix"]))
    torch.set_num_threads(2)
    a, b = (statistics.median(x) for x in per_sample)
    print(f"{name:>8}  A {a * 1e3:7.1f} ms/sample ({min(per_sample[0]) * 1e3:.1f}-{max(per_sample[0]) * 1e3:.1f})  "
          f"B {b * 1e3:7.1f} ms/sample ({min(per_sample[1]) * 1e3:.1f}-{max(per_sample[1]) * 1e3:.1f})  "
          f"ratio B/A {b / a:.3f}  (first update A {setups[0]['compile_s']:.1f} s, B {setups[1]['compile_s']:.1f} s)",
          flush=True)


def versus_mcan_vqa(cfg, dataset, vocab, batches, updates: int, mcan_vqa: Path) -> None:
    """Alternate mcan-vqa's training step (A) and accuvqa's loader + update (B), update by update."""
    from throughput_vs_mcan_vqa import mcan_vqa_net  # benchmarks/ is on sys.path when run as a script

    net = mcan_vqa_net(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix), mcan_vqa)
    orig_optim = torch.optim.Adam(net.parameters(), lr=cfg.LR_BASE, betas=cfg.OPT_BETAS, eps=cfg.OPT_EPS)
    bce = torch.nn.BCELoss(reduction="sum")
    ours = _setup(cfg, vocab, build_model(cfg, len(vocab.token_to_ix), len(vocab.ans_to_ix)).state_dict())["acc"]
    loss_fn = make_loss_fn(cfg)

    def original(i: int) -> float:
        batch = dataset[batches[i % len(batches)]]
        img = torch.zeros(len(batch["ques_ix"]), cfg.IMG_FEAT_PAD_SIZE, cfg.IMG_FEAT_SIZE)
        img[:, : batch["img_feat"].shape[1]] = batch["img_feat"]
        ques = torch.zeros(len(batch["ques_ix"]), cfg.MAX_TOKEN, dtype=torch.int64)
        ques[:, : batch["ques_ix"].shape[1]] = batch["ques_ix"]
        t = time.perf_counter()
        orig_optim.zero_grad()
        loss = bce(net(img, ques), batch["answer_scores"])
        loss.backward()
        float(loss.cpu().data.numpy())
        [float(torch.norm(p.grad).cpu().data.numpy()) for p in net.parameters() if p.grad is not None]
        orig_optim.step()
        return time.perf_counter() - t

    def accuvqa(i: int) -> float:
        t = time.perf_counter()
        batch = {k: v for k, v in dataset[batches[i % len(batches)]].items() if k != "index"}
        ours.step(batch, loss_fn)
        return time.perf_counter() - t

    seconds: list[list[float]] = [[], []]
    for i in range(updates + 1):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            spent = (original, accuvqa)[j](i)
            if i:
                seconds[j].append(spent)
    a, b = (statistics.median(x) for x in seconds)
    print(f"mcan-vqa  A (original step) {cfg.BATCH_SIZE / a:.2f} samples/s ({min(seconds[0]):.2f}-{max(seconds[0]):.2f} "
          f"s/step)  B (accuvqa loader + update) {cfg.BATCH_SIZE / b:.2f} samples/s ({min(seconds[1]):.2f}-"
          f"{max(seconds[1]):.2f} s/update)  speed-up per sample A/B {a / b:.2f}x; regions per batch "
          f"{[int(dataset[x]['img_feat'].shape[1]) for x in batches[:updates + 1]]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--updates", type=int, default=6, help="timed updates of each set-up")
    parser.add_argument("--window", type=int, default=16, help="BUCKET_WINDOW of the bucketed batches")
    parser.add_argument("--levers", nargs="+", default=["profile", "bucket", "sdpa", "adam", "bf16", "threads"])
    parser.add_argument("--mcan-vqa", type=Path, default=None, help="a checkout of MILVLG/mcan-vqa (lever mcan-vqa)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; torch {torch.__version__}, batch {args.batch_size}")
    cfg, dataset, vocab, bucketed = load(args.tree, args.batch_size, args.window)
    plain = epoch_batches(len(dataset), cfg.replace(BUCKET_WINDOW=0), 0, Runtime(torch.device("cpu")))
    for name in args.levers:
        if name == "profile":
            profile(cfg.replace(BUCKET_WINDOW=0), dataset, vocab, plain, args.updates)
            profile(cfg, dataset, vocab, bucketed, args.updates)
            print()
        elif name == "mcan-vqa":
            versus_mcan_vqa(cfg, dataset, vocab, bucketed, args.updates, args.mcan_vqa)
        elif name == "bucket":
            lever(name, cfg, dataset, vocab, bucketed, args.updates, plain_batches=plain)
        else:
            lever(name, cfg, dataset, vocab, bucketed, args.updates)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
