"""Time-to-accuracy reporting shared by the examples: first time a curve reaches a target, the
mean and spread over seeds, the table, and the curves vs wall time and vs epoch (no framework
import; matplotlib only inside ``plot_curves``).

A *run* is a dict with ``optimizer``, ``lr``, ``seed`` and ``history``: equal-length lists
``epoch`` (fractional at evaluations inside an epoch), ``step``, ``seconds`` (training time, the
evaluations excluded) and the metrics recorded at each evaluation.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


def first_reach(history: Dict[str, List[float]], metric: str, target: float, higher_is_better: bool = True) -> Optional[int]:
    """Index of the first evaluation whose ``metric`` reaches ``target``, or None."""
    for i, value in enumerate(history[metric]):
        if (value >= target) if higher_is_better else (value <= target):
            return i
    return None


def to_target(run: Dict[str, Any], metric: str, target: float, higher_is_better: bool = True) -> Dict[str, Optional[float]]:
    """Seconds, epochs and steps at the first evaluation reaching ``target`` (None if never)."""
    h = run["history"]
    i = first_reach(h, metric, target, higher_is_better)
    if i is None:
        return {"seconds": None, "epochs": None, "steps": None}
    return {"seconds": h["seconds"][i], "epochs": h["epoch"][i], "steps": h["step"][i]}


def mean_spread(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Mean and sample standard deviation over the values that exist; ``reached`` counts them.
    A run that never reached the target makes ``mean`` None (it is not averaged away)."""
    present = [v for v in values if v is not None]
    out: Dict[str, Any] = {"reached": len(present), "of": len(values), "values": list(values)}
    if len(present) < len(values) or not present:
        out.update(mean=None, std=None)
    else:
        out.update(mean=statistics.fmean(present), std=statistics.stdev(present) if len(present) > 1 else 0.0)
    return out


def summarize(runs: Sequence[Dict[str, Any]], metric: str, target: float, higher_is_better: bool,
              final_metrics: Sequence[str]) -> Dict[str, Any]:
    """Per optimizer over its seeds: seconds/epochs/steps to target, final metrics, ms/step."""
    hits = [to_target(r, metric, target, higher_is_better) for r in runs]
    summary: Dict[str, Any] = {
        "optimizer": runs[0]["optimizer"],
        "lr": runs[0]["lr"],
        "seeds": [r["seed"] for r in runs],
        "seconds_to_target": mean_spread([h["seconds"] for h in hits]),
        "epochs_to_target": mean_spread([h["epochs"] for h in hits]),
        "steps_to_target": mean_spread([h["steps"] for h in hits]),
        "ms_per_step": mean_spread([1000.0 * r["seconds_per_step"] for r in runs]),
    }
    for name in final_metrics:
        summary[f"final_{name}"] = mean_spread([r["history"][name][-1] for r in runs])
    return summary


def _cell(stat: Dict[str, Any], fmt: str) -> str:
    if stat["mean"] is None:
        return f"not reached ({stat['reached']}/{stat['of']})"
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"


def format_table(summaries: Sequence[Dict[str, Any]], target_label: str, final_metrics: Sequence[str]) -> str:
    """Fixed-width table: time, epochs and steps to the target, ms/step, final metrics."""
    head = ["optimizer", "lr", f"seconds to {target_label}", f"epochs to {target_label}", f"steps to {target_label}", "ms/step"]
    head += [f"final {m.replace('_', ' ')}" for m in final_metrics]
    rows = [head]
    for s in summaries:
        row = [s["optimizer"], f"{s['lr']:g}", _cell(s["seconds_to_target"], ".2f"), _cell(s["epochs_to_target"], ".2f"),
               _cell(s["steps_to_target"], ".0f"), _cell(s["ms_per_step"], ".1f")]
        row += [_cell(s[f"final_{m}"], ".4f" if "acc" in m else ".3g") for m in final_metrics]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratio(numerator: Dict[str, Any], denominator: Dict[str, Any]) -> Optional[float]:
    """numerator mean / denominator mean (None when either is missing)."""
    if numerator["mean"] is None or denominator["mean"] is None or denominator["mean"] == 0:
        return None
    return numerator["mean"] / denominator["mean"]


def plot_curves(runs: Sequence[Dict[str, Any]], path: Path, title: str, panels: Sequence[Dict[str, Any]]) -> None:
    """One row per panel (a metric), columns vs epoch and vs wall time; one colour per optimizer,
    one line per seed.

    Args:
        runs: all runs (any optimizers and seeds).
        path: PNG to write.
        title: figure title.
        panels: dicts with ``metric``, ``label`` and optional ``log`` (log y) and ``target``
            (a horizontal line) and ``ylim``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.4 * len(panels)), squeeze=False)
    colours: Dict[str, str] = {}
    for run in runs:
        colour = colours.setdefault(run["optimizer"], f"C{len(colours)}")
        h = run["history"]
        label = f"{run['optimizer']} (lr {run['lr']:g})" if run is next(r for r in runs if r["optimizer"] == run["optimizer"]) else None
        for row, panel in enumerate(panels):
            values = h[panel["metric"]]
            for col, x in enumerate((h["epoch"], h["seconds"])):
                axes[row, col].plot(x, values, color=colour, alpha=0.8, linewidth=1.2, label=label)
    for row, panel in enumerate(panels):
        for col in range(2):
            ax = axes[row, col]
            if panel.get("log"):
                ax.set_yscale("log")
            if panel.get("target") is not None and not (isinstance(panel["target"], float) and math.isnan(panel["target"])):
                ax.axhline(panel["target"], color="grey", linestyle=":")
            if panel.get("ylim"):
                ax.set_ylim(*panel["ylim"])
            ax.set_ylabel(panel["label"])
            ax.set_xlabel("epoch" if col == 0 else "training seconds")
    axes[0, 0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
