#!/usr/bin/env python3
"""``make bench``: K-FAC vs SGD ratios measured side by side, written as JSON and markdown.

Runs examples/pytorch_synthetic_benchmark.py on 1, 2 and 4 ranks (4 ranks oversubscribe a
2-core machine), examples/keras_synthetic_benchmark.py on 2 ranks, and plans ResNet-50's 107
layers for 8, 64, 256 and 1,024 ranks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hvd_ngd.assignment import assign  # noqa: E402
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


def plans() -> list:
    specs = resnet50_layer_specs()
    rows = []
    for world in (8, 64, 256, 1024):
        for cost in (AssignmentCost.COMPUTE, AssignmentCost.MEMORY):
            rows.append({"ranks": world, "cost": cost.value, "split_factors": True,
                         "max_mean_load": assign(specs, world, cost).max_mean_load})
    return rows


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
    lines += ["", "| ResNet-50 plan: ranks | cost model | max/mean load |", "|---|---|---|"]
    for p in results["plans"]:
        lines.append(f"| {p['ranks']} | {p['cost']} | {p['max_mean_load']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--keras-ranks", default="2", help="ranks for the Keras benchmark ('' to skip)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    synthetic = [run_synthetic(int(n), out, args.iters) for n in args.ranks.split(",") if n]
    synthetic += [run_synthetic(int(n), out, args.iters, "keras") for n in args.keras_ranks.split(",") if n]
    results = {"synthetic": synthetic, "plans": plans()}
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "bench.md").write_text(table)
    print(table)
    print(f"written: {out / 'bench.json'}, {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
