"""Device-to-host reads per step do not grow with the number of layers.

A read is every ``ArrayOps`` call that synchronises with the device (``to_numpy``,
``to_float``, ``all_finite``). The budget (issue: at most 2 when nothing is refreshed, at most 3
at a refresh step) holds for every strategy and both interval policies, on 1, 2 and 4 ranks.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Dict, List

import numpy as np
import pytest

from hvd_ngd import capture
from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops import NumpyOps
from hvd_ngd.preconditioner import Preconditioner
from hvd_ngd.testing import ThreadedWorld


class CountingOps(NumpyOps):
    """NumpyOps that counts host reads per thread (each ThreadedWorld rank is a thread)."""

    def __init__(self) -> None:
        self.reads: Dict[int, int] = defaultdict(int)

    def _count(self) -> None:
        self.reads[threading.get_ident()] += 1

    def to_numpy(self, x):
        self._count()
        return super().to_numpy(x)

    def to_float(self, x):
        self._count()
        return super().to_float(x)

    def all_finite(self, x):
        self._count()
        return super().all_finite(x)

    def mine(self) -> int:
        return self.reads[threading.get_ident()]


def specs(n_layers: int) -> List[LayerSpec]:
    out = [LayerSpec("emb", LayerKind.EMBEDDING, 9, 6, False), LayerSpec("ln", LayerKind.LAYERNORM, 6, 6, True)]
    out += [LayerSpec(f"fc{i}", LayerKind.LINEAR, 6, 6, True) for i in range(n_layers - 2)]
    return out


def reads_per_step(comm, config: KFACConfig, layers: List[LayerSpec], steps: int) -> List[int]:
    """Host reads of each step of this rank (the data-generation reads are not counted)."""
    ops = CountingOps()
    engine = Preconditioner(layers, config, ops, comm)
    rng = np.random.default_rng(comm.rank)
    like = np.zeros(1)
    counts = []
    for _ in range(steps):
        plan = engine.capture_plan()
        for spec in layers:
            wanted = plan.get(spec.name, set())
            if spec.kind is LayerKind.EMBEDDING:
                a, g = rng.integers(0, 9, size=(4, 2)), rng.normal(size=(8, 6))
            elif spec.kind is LayerKind.LAYERNORM:
                a, g = rng.normal(size=(4, 6, 2)), rng.normal(size=(4, 6, 2))
            else:
                a, g = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
            if "A" in wanted:
                engine.accumulate(spec.name, "A", capture.a_statistic(ops, spec, a, like=like))
            if "G" in wanted:
                engine.accumulate(spec.name, "G", capture.g_statistic(ops, spec, g, 4.0))
            if "F" in wanted:
                engine.accumulate(spec.name, "F", capture.f_statistic(ops, spec, a, g, 4.0))
        grads = {
            s.name: rng.normal(size=(2, 6) if s.kind.is_unitwise else ((6, 9) if s.kind is LayerKind.EMBEDDING else (6, 7)))
            for s in layers
        }
        before = ops.mine()
        engine.reduce_and_step(grads, [rng.normal(size=3)], reduce_gradients=True)
        counts.append(ops.mine() - before)
    return counts


CASES = [
    ("spngd", "fixed", {}),
    ("comm-opt", "fixed", {}),
    ("mem-opt", "fixed", {}),
    ("hybrid", "fixed", {"grad_worker_fraction": 0.5}),
    ("spngd", "adaptive", {}),
    ("comm-opt", "adaptive", {}),
    ("comm-opt", "fixed", {"stale_inverse": True}),
]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("strategy,policy,extra", CASES, ids=[f"{c[0]}-{c[1]}-{sorted(c[2])}" for c in CASES])
def test_reads_per_step_are_bounded_and_independent_of_layer_count(world: int, strategy: str, policy: str, extra: dict) -> None:
    if strategy == "hybrid" and world == 1:
        pytest.skip("hybrid needs more than one rank")
    config = KFACConfig(
        strategy=strategy, interval_policy=policy, factor_update_interval=3, inv_update_interval=6,
        adaptive_threshold=10.0, damping=0.01, **extra,
    )
    steps = 13
    by_size = {}
    for n_layers in (4, 40):
        layers = specs(n_layers)
        if world == 1:
            by_size[n_layers] = reads_per_step(SingleProcessCommunicator(), config, layers, steps)
        else:
            per_rank = ThreadedWorld(world).run(lambda comm: reads_per_step(comm, config, layers, steps))
            by_size[n_layers] = [max(r[s] for r in per_rank) for s in range(steps)]
    assert by_size[4] == by_size[40], f"reads grow with the layer count: {by_size}"
    due_steps = {0, 3, 6, 9, 12} if policy == "fixed" else {0}
    for step, count in enumerate(by_size[40]):
        if step in due_steps or policy == "adaptive":
            assert count <= 3, f"step {step}: {count} reads at a refresh step ({by_size[40]})"
        else:
            assert count <= 2, f"step {step}: {count} reads with nothing due ({by_size[40]})"
    quiet = [c for s, c in enumerate(by_size[40]) if s not in due_steps]
    if policy == "fixed":
        assert quiet and max(quiet) <= 2
