#!/usr/bin/env python3
"""``make bench``: K-FAC vs SGD ratios measured side by side, written as JSON and markdown.

Runs, each K-FAC row relative to SGD in the same run:
- examples/pytorch_step_cost.py on 1 and 2 ranks: per-step cost by step type (nothing due,
  factors due, inverses due, 10/100) on the digits CNN and a 40-layer MLP, host reads per step,
  linear-algebra share;
- examples/pytorch_synthetic_benchmark.py on 1, 2 and 4 ranks (4 ranks oversubscribe a 2-core
  machine) and examples/keras_synthetic_benchmark.py on 2 ranks: images/sec and bytes;
- examples/transformer_lm.py on 2 ranks: seconds and steps to the target validation loss,
  AdamW vs K-FAC with the library's defaults plus a learning rate;
- the curvature cost model: predicted vs measured curvature time at 1, 2 and 4 virtual ranks;
- plans of ResNet-50 (107 layers) and BERT-Large for 8 to 1,024 ranks: makespan / lower bound
  with and without factor splitting (scripts/plans.py writes the full tables and the plot).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hvd_ngd.assignment import SplitPolicy, assign  # noqa: E402
from hvd_ngd.costs.benchmark import numpy_curvature_report  # noqa: E402
from hvd_ngd.enums import AssignmentCost  # noqa: E402
from hvd_ngd.models import resnet50_layer_specs  # noqa: E402


def run_synthetic(ranks: int, out: Path, iters: int, framework: str = "pytorch") -> dict:
    path = out / f"synthetic_{framework}_np{ranks}.json"
    cmd = [str(ROOT / ".venv/bin/horovodrun"), "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo",
           str(ROOT / ".venv/bin/python"), str(ROOT / f"examples/{framework}_synthetic_benchmark.py"),
           "--iters", str(iters), "--out", str(path)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=1200)
    return json.loads(path.read_text())


def run_step_cost(ranks: int, out: Path, steps: int) -> list:
    path = out / f"step_cost_np{ranks}.json"
    script = [str(ROOT / ".venv/bin/python"), str(ROOT / "examples/pytorch_step_cost.py"), "--steps", str(steps), "--out", str(path)]
    cmd = script if ranks == 1 else [str(ROOT / ".venv/bin/horovodrun"), "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo"] + script
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=1800)
    return json.loads(path.read_text())


def run_lm(ranks: int, out: Path, steps: int) -> dict:
    """The transformer LM's time to its target validation loss, AdamW vs K-FAC (defaults + lr)."""
    path = out / f"lm_np{ranks}"
    cmd = [str(ROOT / ".venv/bin/horovodrun"), "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo",
           str(ROOT / ".venv/bin/python"), str(ROOT / "examples/transformer_lm.py"), "--steps", str(steps), "--out", str(path)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=1800)
    return json.loads((path / "summary.json").read_text())


def lm_markdown(summary: dict) -> str:
    """The LM section of bench.md: the example's table and K-FAC / AdamW ratios."""
    cmp = summary.get("comparison", {})
    fmt = lambda v: "not reached" if v is None else f"{v:.2f}x"  # noqa: E731
    return (f"## Transformer LM: time to the target validation loss\n\n{summary['setup']}\n\n```\n{summary['table']}\n```\n\n"
            f"K-FAC / AdamW: seconds {fmt(cmp.get('kfac_seconds_vs_adamw'))}, steps {fmt(cmp.get('kfac_steps_vs_adamw'))}\n")


def plans() -> list:
    specs = resnet50_layer_specs()
    rows = []
    for world in (8, 64, 256, 1024):
        for split in (False, True):
            plan = assign(specs, world, AssignmentCost.COMPUTE, split=SplitPolicy() if split else None)
            rows.append({"ranks": world, "splitting": split, "makespan_ratio": plan.makespan_ratio,
                         "makespan": plan.makespan})
    return rows


def step_cost_markdown(runs: list) -> str:
    lines = ["| workload | strategy | ranks | step type | median / SGD | mean / SGD | host reads / step | "
             "eigh+matmul share of the extra | outside linear algebra / SGD |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for name, r in run["rows"].items():
            if name == "sgd":
                continue
            share = f"{r['linalg_share_of_kfac_extra']:.0%}" if name == "inverses due" else "-"
            outside = f"{r['outside_linalg_vs_sgd']:.2f}" if name == "inverses due" else "-"
            lines.append(f"| {run['workload']} | {run['strategy']} | {run['ranks']} | {name} | {r['median_vs_sgd']:.2f} | "
                         f"{r['mean_vs_sgd']:.2f} | {r['host_reads_per_step']:.1f} | {share} | {outside} |")
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    lines = ["| framework | ranks | strategy | variant | img/s | time / SGD | bytes / SGD | statistics skipped | "
             "bytes saved vs every-step |", "|---|---|---|---|---|---|---|---|---|"]
    for run in results["synthetic"]:
        every = {r["strategy"]: r["bytes_per_step"] for r in run["rows"] if r["variant"] == "every-step"}
        for r in run["rows"]:
            b = "-" if r["bytes_vs_sgd"] is None else f"{r['bytes_vs_sgd']:.2f}"
            base = every.get(r["strategy"])
            saved = f"{1 - r['bytes_per_step'] / base:.2f}" if base and r["variant"] != "sgd" else "-"
            lines.append(f"| {run.get('framework', 'pytorch')} | {run['ranks']} | {r['strategy']} | {r['variant']} | "
                         f"{r['images_per_sec']:.1f} | {r['time_vs_sgd']:.2f} | {b} | {r['skipped_fraction']:.2f} | {saved} |")
    lines += ["", "| ResNet-50 plan (n^3 cost): ranks | factor splitting | makespan / lower bound | makespan (cost units) |",
              "|---|---|---|---|"]
    for p in results["plans"]:
        lines.append(f"| {p['ranks']} | {'on' if p['splitting'] else 'off'} | {p['makespan_ratio']:.2f} | {p['makespan']:.3g} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--keras-ranks", default="2", help="ranks for the Keras benchmark ('' to skip)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--step-cost-ranks", default="1,2")
    parser.add_argument("--step-cost-steps", type=int, default=80)
    parser.add_argument("--lm-ranks", default="2", help="ranks for the transformer LM ('' to skip)")
    parser.add_argument("--lm-steps", type=int, default=300)
    args = parser.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    step_cost = [run for n in args.step_cost_ranks.split(",") if n for run in run_step_cost(int(n), out, args.step_cost_steps)]
    synthetic = [run_synthetic(int(n), out, args.iters) for n in args.ranks.split(",") if n]
    synthetic += [run_synthetic(int(n), out, args.iters, "keras") for n in args.keras_ranks.split(",") if n]
    lm = [run_lm(int(n), out, args.lm_steps) for n in args.lm_ranks.split(",") if n]
    curvature_md, curvature_rows, _ = numpy_curvature_report(out / "cost_model_numpy.json")
    results = {"step_cost": step_cost, "synthetic": synthetic, "lm": [{k: v for k, v in r.items() if k != "runs"} for r in lm],
               "plans": plans(), "curvature": curvature_rows}
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=float))
    table = "## Per-step cost by step type (thread CPU clock)\n\n" + step_cost_markdown(step_cost) + "\n" + markdown(results)
    table += "".join("\n" + lm_markdown(r) for r in lm)
    table += "\n" + curvature_md
    (out / "bench.md").write_text(table)
    print(table)
    print(f"written: {out / 'bench.json'}, {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
