"""Time to a target validation loss for a small decoder-only transformer LM: AdamW vs K-FAC.

    horovodrun -np 2 -H localhost:2 --gloo python examples/transformer_lm.py --out results/lm_torch

Corpus: the Python standard library's own top-level ``.py`` sources (shipped with every Python,
nothing downloaded), read as bytes (vocabulary 256). Files are sorted by name; every
``VAL_EVERY``-th file is held out for validation, the rest is training text (capped at
``--train-bytes``). Model: token and position embeddings, ``--layers`` pre-LayerNorm blocks of
causal self-attention (query/key/value and output projections are ``nn.Linear``; attention is
``F.scaled_dot_product_attention(is_causal=True)``) and a GELU MLP, a final LayerNorm and a
linear head. Every rank draws its own random windows each step (global batch = ranks x
``--batch-size``); validation loss is the mean over a fixed set of held-out windows, evaluated
every ``--eval-every`` steps outside the clock.

Both optimizers use linear warm-up (``WARMUP_STEPS``) then cosine decay to 0 at ``--steps``.
AdamW: ``hvd.DistributedOptimizer``, weight decay 0.01, lr from ``SWEEP``. K-FAC:
``hvd_ngd.torch.DistributedOptimizer`` around SGD-momentum 0.9 with the library's defaults plus
the learning rate (Linear, Embedding and LayerNorm layers are preconditioned).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import horovod.torch as hvd
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hvd_ngd.torch as ngd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reporting import format_table, plot_curves, ratio, summarize  # noqa: E402

VAL_EVERY = 10
WARMUP_STEPS = 30
TARGET_LOSS = 2.4  # nats per byte on the held-out files (uniform over bytes: 5.55)
LEARNING_RATES = {"adamw": 1e-2, "kfac": 0.1}
#: K-FAC settings besides lr (empty: the library's defaults); ``--kfac-config`` overrides for experiments.
KFAC_CONFIG: Dict[str, Any] = {}
#: The lr sweep behind ``LEARNING_RATES``: one process on the global batch (32 windows x 64
#: bytes, the same samples per step as 2 ranks x 16), 300 steps, seed 0, this schedule:
#: lr -> (steps to TARGET_LOSS, final validation loss). Measured 2026-12-01.
SWEEP: Dict[str, Dict[float, Tuple[Any, float]]] = {
    "adamw": {1e-3: (None, 2.544), 3e-3: (180, 2.330), 1e-2: (120, 2.180)},
    "kfac": {0.1: (180, 2.325), 0.3: (None, 2.426)},
}
FINAL_METRICS = ("val_loss", "train_loss")


def load_corpus(train_bytes: int = 2_000_000, val_bytes: int = 200_000) -> Tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out validation bytes of the standard library's top-level sources."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if len(files) < 2 * VAL_EVERY:
        raise RuntimeError(f"found only {len(files)} standard-library sources under {sysconfig.get_paths()['stdlib']}")
    train, val = bytearray(), bytearray()
    for i, path in enumerate(files):
        target, cap = (val, val_bytes) if i % VAL_EVERY == 0 else (train, train_bytes)
        if len(target) < cap:
            target += Path(path).read_bytes()[: cap - len(target)]
    as_tensor = lambda b: torch.from_numpy(np.frombuffer(bytes(b), dtype=np.uint8).astype(np.int64))  # noqa: E731
    return as_tensor(train), as_tensor(val)


class Block(nn.Module):
    """Pre-LN transformer block: causal multi-head self-attention and a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.proj = nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        split = lambda y: y.view(n, t, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Decoder-only byte-level transformer."""

    def __init__(self, vocab: int = 256, width: int = 64, heads: int = 4, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token(tokens) + self.position(positions)[None]
        return self.head(self.ln(self.blocks(x)))


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets of the windows beginning at ``starts``."""
    idx = starts[:, None] + torch.arange(context + 1)[None]
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


def make_optimizer(kind: str, model: nn.Module, lr: float):
    """Horovod-distributed AdamW, or K-FAC (library defaults + lr) around SGD-momentum."""
    if kind == "adamw":
        return hvd.DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01),
                                        named_parameters=model.named_parameters())
    if kind == "kfac":
        return ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), model, lr=lr, **KFAC_CONFIG)
    raise ValueError(f"unknown optimizer {kind!r}: choose adamw or kfac")


def warmup_cosine(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def train_one(kind: str, data: Tuple[torch.Tensor, torch.Tensor], steps: int, batch_size: int, seed: int, lr: float,
              eval_every: int, model_args: Dict[str, int], val_windows: int = 64) -> Dict[str, Any]:
    """Train one optimizer for ``steps`` steps; returns the run (identical history on every rank)."""
    train, val = data
    torch.manual_seed(seed)
    model = TinyLM(**model_args)
    context = model.context
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = make_optimizer(kind, model, lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, min(WARMUP_STEPS, steps // 4 + 1)))
    gen = torch.Generator().manual_seed(seed * 1000 + hvd.rank())
    val_gen = torch.Generator().manual_seed(12345)
    val_x, val_y = windows(val, torch.randint(0, len(val) - context - 1, (val_windows,), generator=val_gen), context)
    history: Dict[str, List[float]] = {k: [] for k in ("epoch", "step", "seconds", "val_loss", "train_loss")}
    clock, recent = 0.0, []
    tokens_per_step = batch_size * context * hvd.size()
    for step in range(1, steps + 1):
        x, y = windows(train, torch.randint(0, len(train) - context - 1, (batch_size,), generator=gen), context)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = lm_loss(model, x, y)
        loss.backward()
        opt.step()
        schedule.step()
        clock += time.perf_counter() - t0
        recent.append(loss.item())
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                val_loss = lm_loss(model, val_x, val_y).item()
            model.train()
            train_loss = hvd.allreduce(torch.tensor(float(np.mean(recent))), name=f"lm.loss.{kind}.{seed}.{step}").item()
            recent = []
            for key, value in (("epoch", step * tokens_per_step / len(train)), ("step", step), ("seconds", clock),
                               ("val_loss", val_loss), ("train_loss", train_loss)):
                history[key].append(value)
            if hvd.rank() == 0 and os.environ.get("LM_VERBOSE"):
                print(f"{kind} step {step} val {val_loss:.3f} train {train_loss:.3f} {1000 * clock / step:.1f} ms/step", flush=True)
    return {"optimizer": kind, "lr": lr, "seed": seed, "history": history, "seconds_per_step": clock / steps,
            "kfac_skipped_fraction": opt.kfac.engine.tracker.counts.skipped_fraction if kind == "kfac" else None,
            "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16, help="windows per rank per step")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--train-bytes", type=int, default=2_000_000)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--target", type=float, default=TARGET_LOSS)
    parser.add_argument("--optimizers", default="adamw,kfac")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lr", default="", help="overrides, e.g. adamw=1e-3,kfac=0.2")
    parser.add_argument("--out", default="results/lm_torch")
    parser.add_argument("--kfac-config", default="{}", help='JSON of KFACConfig fields, e.g. \'{"damping": 0.01}\'')
    args = parser.parse_args()
    KFAC_CONFIG.update(json.loads(args.kfac_config))
    hvd.init()
    torch.set_num_threads(1)
    lrs = dict(LEARNING_RATES, **{k: float(v) for k, v in (item.split("=") for item in args.lr.split(",") if item)})
    data = load_corpus(args.train_bytes)
    model_args = dict(width=args.width, heads=args.heads, layers=args.layers, context=args.context)
    kinds = args.optimizers.split(",")
    runs = [train_one(k, data, args.steps, args.batch_size, int(s), lrs[k], args.eval_every, model_args)
            for s in args.seeds.split(",") for k in kinds]
    if hvd.rank() != 0:
        return
    summaries = [summarize([r for r in runs if r["optimizer"] == k], "val_loss", args.target, False, FINAL_METRICS) for k in kinds]
    header = (f"byte-level transformer LM on the stdlib sources, {hvd.size()} Horovod ranks, {args.batch_size}x{args.context} "
              f"tokens per rank per step, {args.steps} steps, seeds {args.seeds}")
    table = format_table(summaries, f"val {args.target:g}", FINAL_METRICS)
    print(header + "\n" + table)
    by_kind = {s["optimizer"]: s for s in summaries}
    comparison = {}
    if "kfac" in by_kind and "adamw" in by_kind:
        comparison = {"kfac_seconds_vs_adamw": ratio(by_kind["kfac"]["seconds_to_target"], by_kind["adamw"]["seconds_to_target"]),
                      "kfac_steps_vs_adamw": ratio(by_kind["kfac"]["steps_to_target"], by_kind["adamw"]["steps_to_target"])}
        print(f"K-FAC / AdamW to val {args.target:g}: seconds {comparison['kfac_seconds_vs_adamw']}, steps {comparison['kfac_steps_vs_adamw']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        runs_out = [{k: v for k, v in r.items() if k != "params"} for r in runs]
        (out / "summary.json").write_text(json.dumps({"setup": header, "summaries": summaries, "comparison": comparison,
                                                      "table": table, "runs": runs_out}, indent=2))
        plot_curves(runs, out / "lm.png", header, [dict(metric="val_loss", label="validation loss", target=args.target),
                                                   dict(metric="train_loss", label="training loss")])
        print(f"summary: {out / 'summary.json'}\nplot: {out / 'lm.png'}")


if __name__ == "__main__":
    main()
