"""Predicted vs measured curvature time per step (inverses + preconditioning) on this machine.

For each world size, the plan's work is executed rank by rank on this one process (virtual
ranks: each rank's share run serially): first every rank's statistic blocks are inverted (timed
per rank, once), then every rank preconditions its layers with the blocks' inverses (timed per
rank, the faster of two passes: it runs every step, warm).
A rank's measured time is its inverses plus its preconditioning; the plan's load is the
prediction. The measured makespan is the slowest virtual rank. Random SPD factors of the
planned block sizes stand in for real statistics (the cost does not depend on the values).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from hvd_ngd.assignment import SplitPolicy, assign
from hvd_ngd.assignment.plan import AssignmentPlan, TaskKey
from hvd_ngd.blocks import precondition_block_kronecker
from hvd_ngd.costs.cache import load_or_calibrate
from hvd_ngd.costs.model import CostModel
from hvd_ngd.enums import InverseMethod
from hvd_ngd.inverse import FactorInverse, invert_factor
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.models import resnet50_layer_specs
from hvd_ngd.ops.base import Array, ArrayOps
from hvd_ngd.ops.numpy_ops import NumpyOps
from hvd_ngd.unitwise import unitwise_precondition


def _sync(ops: ArrayOps, x: Array) -> None:
    ops.to_float(ops.sum(ops.flatten(x)))


def _factor(ops: ArrayOps, like: Array, size: int, diagonal: bool, dtype: str, rng: np.random.Generator) -> Array:
    if diagonal:
        return ops.cast(ops.from_numpy(rng.uniform(0.1, 1.0, size=size), like), dtype)
    x = rng.normal(size=(size, size))  # full rank, like calibrate's (eigh deflates low-rank input)
    return ops.cast(ops.from_numpy(x @ x.T / size + np.eye(size), like), dtype)


def execute_plan(
    ops: ArrayOps,
    like: Array,
    specs: Sequence[LayerSpec],
    plan: AssignmentPlan,
    method: InverseMethod = InverseMethod.EIGEN,
    damping: float = 1e-3,
    dtype: str = "float32",
    seed: int = 0,
    timer: Callable[[], float] = time.perf_counter,
) -> Tuple[List[float], List[float]]:
    """Measured seconds per virtual rank of one step: (inverses, preconditioning)."""
    rng = np.random.default_rng(seed)
    by_name = {s.name: s for s in specs}
    world = len(plan.loads)
    inverse_s = [0.0] * world
    precondition_s = [0.0] * world
    inverses: Dict[TaskKey, FactorInverse] = {}
    share = damping ** 0.5
    for rank in range(world):
        tasks = [t for t in plan.tasks_of(rank) if t.key.statistic != "F"]
        inputs = [_factor(ops, like, t.size, t.diagonal, dtype, rng) for t in tasks]
        start = timer()
        for t, x in zip(tasks, inputs):
            inv = invert_factor(ops, x, method, share, diagonal=t.diagonal)
            _sync(ops, inv.eigvals if method is InverseMethod.EIGEN else inv.inverse)
            inverses[t.key] = inv
        inverse_s[rank] = timer() - start
    for rank in range(world):
        work = []
        for name in plan.layers_of(rank):
            spec = by_name[name]
            if spec.kind.is_unitwise:
                c = spec.out_features
                fisher = ops.cast(ops.from_numpy(np.abs(rng.normal(size=(c, 3))) + [1.0, 0.0, 1.0], like), dtype)
                grads = [ops.cast(ops.from_numpy(rng.normal(size=c), like), dtype) for _ in range(2)]
                work.append((spec, fisher, grads))
            else:
                grad = ops.cast(ops.from_numpy(rng.normal(size=(spec.g_dim, spec.a_dim)), like), dtype)
                work.append((spec, grad, None))
        best = float("inf")
        for _ in range(2):  # preconditioning runs every step: time it warm, as calibrate does
            start = timer()
            for spec, x, grads in work:
                if grads is not None:
                    out = unitwise_precondition(ops, x, grads[0], grads[1], damping)[0]
                else:
                    la, lg = plan.blocks(spec.name, "A"), plan.blocks(spec.name, "G")
                    a_inv = [inverses[TaskKey(spec.name, "A", b)] for b in range(la.k)]
                    g_inv = [inverses[TaskKey(spec.name, "G", b)] for b in range(lg.k)]
                    out = precondition_block_kronecker(ops, x, la, a_inv, lg, g_inv, damping)
                _sync(ops, out)
            best = min(best, timer() - start)
        precondition_s[rank] = best
    return inverse_s, precondition_s


def curvature_benchmark(
    ops: ArrayOps,
    like: Array,
    specs: Sequence[LayerSpec],
    model: CostModel,
    worlds: Sequence[int] = (1, 2, 4),
    split: Optional[SplitPolicy] = None,
    damping: float = 1e-3,
    dtype: str = "float32",
    timer: Callable[[], float] = time.perf_counter,
    blocks: Optional[Mapping[Tuple[str, str], int]] = None,
) -> List[Dict[str, float]]:
    """Rows of predicted vs measured per-step curvature time for each world size.

    Each row: ranks, predicted and measured makespan (seconds), their ratio, predicted and
    measured totals over ranks (all work, inverses, preconditioning), and the largest per-rank
    relative error. ``split`` / ``blocks`` as for ``assignment.assign``.
    """
    rows = []
    for world in worlds:
        plan = assign(list(specs), world, cost_model=model, split=split, blocks=blocks)
        inverse_s, precondition_s = execute_plan(ops, like, specs, plan, model.method, damping, dtype, timer=timer)
        measured = [a + b for a, b in zip(inverse_s, precondition_s)]
        predicted_pre = sum(plan.precondition_cost.values())
        errors = [abs(p - m) / m for p, m in zip(plan.loads, measured) if m > 0]
        rows.append({
            "ranks": world,
            "predicted_s": plan.makespan,
            "measured_s": max(measured),
            "measured_over_predicted": max(measured) / plan.makespan if plan.makespan > 0 else float("nan"),
            "predicted_total_s": sum(plan.loads),
            "measured_total_s": sum(measured),
            "worst_rank_error": max(errors, default=0.0),
            "predicted_inverse_total_s": sum(plan.loads) - predicted_pre,
            "measured_inverse_total_s": sum(inverse_s),
            "predicted_precondition_total_s": predicted_pre,
            "measured_precondition_total_s": sum(precondition_s),
        })
    return rows


def benchmark_markdown(rows: Sequence[Dict[str, float]], title: str = "") -> str:
    """``curvature_benchmark`` rows as a markdown table."""
    lines = [title, ""] if title else []
    lines += ["| virtual ranks | predicted s/step | measured s/step | measured / predicted | "
              "inverses: predicted / measured s (all ranks) | preconditioning: predicted / measured s | "
              "worst rank error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['predicted_s']:.3f} | {r['measured_s']:.3f} | "
                     f"{r['measured_over_predicted']:.2f} | {r['predicted_inverse_total_s']:.3f} / "
                     f"{r['measured_inverse_total_s']:.3f} | {r['predicted_precondition_total_s']:.3f} / "
                     f"{r['measured_precondition_total_s']:.3f} | {r['worst_rank_error']:.2f} |")
    return "\n".join(lines) + "\n"


def blas_threads(n: int):
    """A context limiting numpy's BLAS to ``n`` threads (threadpoolctl, which scikit-learn
    brings); a no-op context for ``n <= 0`` or without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(n) if n > 0 else contextlib.nullcontext()


def numpy_curvature_report(
    cache: Path, width: int = 12, worlds: Sequence[int] = (1, 2, 4), cpu_clock: bool = True
) -> Tuple[str, List[Dict[str, float]], CostModel]:
    """What ``make bench`` prints: calibrate numpy now (cached at ``cache``), then predicted vs
    measured curvature time of a ResNet-50 of ``width`` (100 classes) at ``worlds`` virtual ranks.

    With ``cpu_clock`` BLAS runs on one thread and both calibration and measurement count that
    thread's CPU time, so other processes on a shared machine do not enter the numbers.

    Returns:
        (markdown table, rows, the calibrated model).
    """
    ops, like = NumpyOps(), np.zeros(1, dtype=np.float32)
    timer = time.thread_time if cpu_clock else time.perf_counter
    threads = 1 if cpu_clock else 0
    with blas_threads(threads):
        model = load_or_calibrate(Path(cache), ops, like, extra_fingerprint={"threads": threads},
                                  recalibrate=True, timer=timer).model
        specs = resnet50_layer_specs(num_classes=100, width=width)
        rows = curvature_benchmark(ops, like, specs, model, worlds=worlds, timer=timer)
    title = (f"Predicted vs measured curvature time per step: ResNet-50 at width {width} (100 classes), numpy, "
             f"{'thread CPU time, 1 BLAS thread' if cpu_clock else 'wall clock'}, each virtual rank's share run serially")
    return benchmark_markdown(rows, title), rows, model
