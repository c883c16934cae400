"""What the examples share: the digits plot, and the synthetic benchmarks' variants, command
line and table (no framework import).

The examples add their own folder to ``sys.path`` and import this module, so it works when they
run as scripts (``horovodrun ... python examples/...``) and when tests load them by path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

TARGET = 0.97  # test accuracy the digits examples race to

#: K-FAC variants of the synthetic benchmarks (config overrides), measured against SGD.
VARIANTS: Dict[str, Dict[str, Any]] = {
    "every-step": dict(factor_update_interval=1, inv_update_interval=1),
    "fixed-10/100": dict(factor_update_interval=10, inv_update_interval=100),
    "fixed-10/100-fp16": dict(factor_update_interval=10, inv_update_interval=100, wire_dtype="float16"),
    "adaptive": dict(interval_policy="adaptive"),
}


def plot_digits(results: Dict[str, Dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy and loss (training solid, test dashed where recorded) vs epoch and vs wall time.

    Args:
        results: per optimizer, a dict with ``lr`` and ``history`` (``epoch``, ``seconds``,
            ``test_accuracy``, ``train_loss`` and optionally ``test_loss`` lists).
        path: PNG to write.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for i, (kind, res) in enumerate(results.items()):
        h, color = res["history"], f"C{i}"
        for col, x in enumerate((h["epoch"], h["seconds"])):
            axes[0, col].plot(x, h["test_accuracy"], color=color, label=f"{kind} (lr {res['lr']:g})")
            axes[1, col].plot(x, h["train_loss"], color=color, label=f"{kind} train")
            if h.get("test_loss"):
                axes[1, col].plot(x, h["test_loss"], color=color, linestyle="--", label=f"{kind} test")
    for ax in axes[0]:
        ax.axhline(TARGET, color="grey", linestyle=":")
        ax.set_ylim(0.8, 1.0)
        ax.set_ylabel("test accuracy")
    for ax in axes[1]:
        ax.set_yscale("log")
        ax.set_ylabel("loss")
    for ax in axes[:, 0]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 1]:
        ax.set_xlabel("seconds")
    axes[0, 0].legend()
    axes[1, 1].legend(fontsize="small", ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """Add ``time_vs_sgd`` and ``bytes_vs_sgd`` to every benchmark row (rows[0] is SGD), in place."""
    sgd = rows[0]
    for row in rows:
        row["time_vs_sgd"] = row["seconds_per_step"] / sgd["seconds_per_step"]
        row["bytes_vs_sgd"] = row["bytes_per_step"] / sgd["bytes_per_step"] if sgd["bytes_per_step"] else None


def format_table(rows: List[Dict[str, Any]], header: str) -> str:
    """The benchmark rows as the fixed-width table the synthetic benchmarks print."""
    lines = [header, f"{'strategy':<10} {'variant':<18} {'img/s':>8} {'ms/step':>8} {'time/SGD':>9} {'bytes/SGD':>10} {'skipped':>8}"]
    for r in rows:
        b = "-" if r["bytes_vs_sgd"] is None else f"{r['bytes_vs_sgd']:.2f}"
        lines.append(f"{r['strategy']:<10} {r['variant']:<18} {r['images_per_sec']:>8.1f} {1000 * r['seconds_per_step']:>8.1f} "
                     f"{r['time_vs_sgd']:>9.2f} {b:>10} {r['skipped_fraction']:>8.2f}")
    return "\n".join(lines)


def benchmark_row(variant: str, strategy: str, elapsed: float, iters: int, images_per_step: int, bytes_per_step: float,
                  skipped_fraction: float) -> Dict[str, Any]:
    """One measured variant: time per step, throughput, bytes per rank per step, statistics skipped."""
    return {
        "variant": variant,
        "strategy": strategy,
        "seconds_per_step": elapsed / iters,
        "images_per_sec": images_per_step * iters / elapsed,
        "bytes_per_step": bytes_per_step,
        "skipped_fraction": skipped_fraction,
    }


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    """The synthetic benchmarks' common command line (each adds its framework's options)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=["small", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--strategies", default="spngd,comm-opt,mem-opt")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--assignment-cost", default="communication", choices=["compute", "memory", "communication"],
                        help="cost model of spngd's owner plan (KAISA strategies use compute)")
    parser.add_argument("--out", default="")
    return parser


def report(rows: List[Dict[str, Any]], args: argparse.Namespace, framework: str, ranks: int, device: str) -> None:
    """Add the ratios to ``rows`` (rows[0] is SGD), print the table and write ``args.out`` (JSON)
    when given; call it on one rank."""
    add_ratios(rows)
    print(format_table(rows, f"{framework} model {args.model}, {ranks} ranks, batch {args.batch_size}/rank, {device}"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"framework": framework, "model": args.model, "ranks": ranks, "device": device,
                                              "batch_per_rank": args.batch_size, "rows": rows}, indent=2))
