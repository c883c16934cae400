"""What the examples share: the digits plot and the benchmark table (no framework import).

The examples add their own folder to ``sys.path`` and import this module, so it works when they
run as scripts (``horovodrun ... python examples/...``) and when tests load them by path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

TARGET = 0.97  # test accuracy the digits examples race to


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
