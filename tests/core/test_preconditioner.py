"""The engine's strategies on an in-process world of threads (no Horovod): N ranks with local
data produce the same preconditioned gradients as one rank with all the data, and every rank
gets identical results."""

from __future__ import annotations

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

OPS = NumpyOps()
SPECS = [
    LayerSpec("fc1", LayerKind.LINEAR, 5, 4, True),
    LayerSpec("conv", LayerKind.CONV2D, 6, 3, False),
    LayerSpec("emb", LayerKind.EMBEDDING, 7, 3, False),
    LayerSpec("norm", LayerKind.LAYERNORM, 4, 4, True),
    LayerSpec("fc2", LayerKind.LINEAR, 4, 2, False),
]
LOCAL = 3
STEPS = 5


def make_data(world: int):
    """Per step: activations/output-grads per layer for world*LOCAL samples and the per-sample
    gradient contributions (so gradients average exactly like a mean loss)."""
    rng = np.random.default_rng(0)
    n = world * LOCAL
    steps = []
    for _ in range(STEPS):
        d = {
            "fc1": (rng.normal(size=(n, 5)), rng.normal(size=(n, 4))),
            "conv": (rng.normal(size=(n, 4, 6)), rng.normal(size=(n, 4, 3))),
            "emb": (rng.integers(0, 7, size=(n, 2)), rng.normal(size=(n * 2, 3))),
            "norm": (rng.normal(size=(n, 4, 2)), rng.normal(size=(n, 4, 2))),
            "fc2": (rng.normal(size=(n, 4)), rng.normal(size=(n, 2))),
        }
        grads = {
            "fc1": rng.normal(size=(n, 4, 6)),
            "conv": rng.normal(size=(n, 3, 6)),
            "emb": rng.normal(size=(n, 3, 7)),
            "norm": rng.normal(size=(n, 2, 4)),
            "fc2": rng.normal(size=(n, 2, 4)),
        }
        other = rng.normal(size=(n, 3))
        steps.append((d, grads, other))
    return steps


def run(comm, config: KFACConfig, world: int, lo: int, hi: int):
    engine = Preconditioner(SPECS, config, OPS, comm)
    outputs = []
    like = np.zeros(1)
    for d, grads, other in make_data(world):
        plan = engine.capture_plan()
        for spec in SPECS:
            a, g = d[spec.name]
            a, g = a[lo:hi], (g[lo * 2 : hi * 2] if spec.name == "emb" else g[lo:hi])
            g = g / (hi - lo)  # what a mean loss over the local batch yields
            wanted = plan.get(spec.name, set())
            if "A" in wanted:
                engine.accumulate(spec.name, "A", capture.a_statistic(OPS, spec, a, like=like))
            if "G" in wanted:
                engine.accumulate(spec.name, "G", capture.g_statistic(OPS, spec, g, float(hi - lo)))
            if "F" in wanted:
                engine.accumulate(spec.name, "F", capture.f_statistic(OPS, spec, a, g, float(hi - lo)))
        local = {k: v[lo:hi].mean(axis=0) for k, v in grads.items()}
        local_other = [other[lo:hi].mean(axis=0)]
        if config.strategy.value != "spngd":  # KAISA expects averaged gradients
            local = {k: comm.allreduce(v, name=f"g.{k}") for k, v in local.items()}
            local_other = [comm.allreduce(local_other[0], name="g.other")]
        pgrads, others = engine.step(local, local_other)
        outputs.append(({k: np.array(v) for k, v in pgrads.items()}, [np.array(o) for o in others]))
    return outputs, engine


CONFIGS = [
    dict(strategy="spngd"),
    dict(strategy="spngd", factor_update_interval=2, inv_update_interval=2, wire_dtype="float32"),
    dict(strategy="spngd", interval_policy="adaptive", adaptive_threshold=0.3),
    dict(strategy="spngd", assignment_cost="communication"),
    dict(strategy="comm-opt"),
    dict(strategy="comm-opt", inverse_method="cholesky"),
    dict(strategy="mem-opt"),
    dict(strategy="hybrid", grad_worker_fraction=0.5),
    dict(strategy="comm-opt", stale_inverse=True, inv_update_interval=2),
]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(sorted(c.items())) for c in CONFIGS])
def test_world_matches_single_process(world: int, cfg: dict) -> None:
    config = dict(damping=0.01, factor_decay=0.7, kl_clip=0.1, lr=0.1, **cfg)
    ref_cfg = dict(config)
    if cfg["strategy"] in ("hybrid", "mem-opt"):
        ref_cfg["strategy"] = "comm-opt"
        ref_cfg.pop("grad_worker_fraction", None)
    reference, _ = run(SingleProcessCommunicator(), KFACConfig(**ref_cfg), world, 0, world * LOCAL)
    results = ThreadedWorld(world).run(
        lambda comm: run(comm, KFACConfig(**config), world, comm.rank * LOCAL, (comm.rank + 1) * LOCAL)[0]
    )
    for step in range(STEPS):
        for rank in range(world):
            pgrads, others = results[rank][step]
            for name, value in reference[step][0].items():
                np.testing.assert_allclose(pgrads[name], value, rtol=1e-9, atol=1e-12, err_msg=f"{name} step {step} rank {rank}")
                assert np.array_equal(pgrads[name], results[0][step][0][name]), f"rank {rank} differs on {name}"
            if cfg["strategy"] == "spngd":
                np.testing.assert_allclose(others[0], reference[step][1][0], rtol=1e-12)


def test_spngd_owners_only_hold_their_factors() -> None:
    config = KFACConfig(strategy="spngd", damping=0.01)

    def body(comm):
        _, engine = run(comm, config, 2, comm.rank * LOCAL, (comm.rank + 1) * LOCAL)
        return engine.rank, sorted(engine.factors), {n: engine.layer_owner(n) for n in engine.layer_order}

    results = ThreadedWorld(2).run(body)
    owners = results[0][2]
    for rank, held, _ in results:
        expected = sorted(k for k in held if owners[k.rsplit("/", 1)[0]] == rank)
        assert held == expected and held, f"rank {rank} holds factors of layers it does not own: {held}"


def test_adaptive_policy_skips_statistics() -> None:
    config = KFACConfig(strategy="comm-opt", interval_policy="adaptive", adaptive_threshold=10.0, damping=0.01)
    _, engine = run(SingleProcessCommunicator(), config, 1, 0, LOCAL)
    counts = engine.tracker.counts
    assert counts.skipped > 0 and counts.refreshed > 0
