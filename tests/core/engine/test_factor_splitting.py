"""Split factors in the engine: each block its own statistic, owner and inverse; the result
is the block-diagonal K-FAC step, on any world size."""

from __future__ import annotations

import numpy as np
import pytest

from hvd_ngd import capture
from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.enums import LayerKind
from hvd_ngd.keys import StatKey, Statistic
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops import NumpyOps
from hvd_ngd.preconditioner import Preconditioner
from hvd_ngd.testing import ThreadedWorld

OPS = NumpyOps()
SPECS = [LayerSpec("fc1", LayerKind.LINEAR, 7, 6, True), LayerSpec("emb", LayerKind.EMBEDDING, 6, 4, False)]
BLOCKS = {"fc1/A": 3, "fc1/G": 2, "emb/G": 2}


def blockdiag(x, sizes):
    out = np.zeros_like(x)
    o = 0
    for s in sizes:
        out[o : o + s, o : o + s] = x[o : o + s, o : o + s]
        o += s
    return out


def run(comm, config, world, steps=3):
    engine = Preconditioner(SPECS, config, OPS, comm)
    rng = np.random.default_rng(5)
    outs, refs = [], []
    n = 4 * world
    lo, hi = 4 * comm.rank, 4 * (comm.rank + 1)
    for _ in range(steps):
        a, g = rng.normal(size=(n, 7)), rng.normal(size=(n, 6))
        ids, ge = rng.integers(0, 6, size=(n, 2)), rng.normal(size=(2 * n, 4))
        grads = {"fc1": rng.normal(size=(6, 8)), "emb": rng.normal(size=(4, 6))}
        engine.accumulate("fc1", "A", capture.a_statistic(OPS, SPECS[0], a[lo:hi]))
        engine.accumulate("fc1", "G", capture.g_statistic(OPS, SPECS[0], g[lo:hi], 1.0))
        engine.accumulate("emb", "A", capture.a_statistic(OPS, SPECS[1], ids[lo:hi], like=np.zeros(1)))
        engine.accumulate("emb", "G", capture.g_statistic(OPS, SPECS[1], ge[2 * lo : 2 * hi], 1.0))
        pgrads, _ = engine.step(grads)
        outs.append(pgrads)
        # dense reference from the full-batch factors of this step (factor_decay 0)
        a1 = np.concatenate([a, np.ones((n, 1))], 1)
        A = blockdiag(a1.T @ a1 / n, [3, 3, 2])
        G = blockdiag(g.T @ g / n, [3, 3])
        Ae = np.diag(np.bincount(ids.reshape(-1), minlength=6) / (2 * n))
        Ge = blockdiag(ge.T @ ge / (2 * n), [2, 2])
        ref = {}
        for name, (fa, fg) in {"fc1": (A, G), "emb": (Ae, Ge)}.items():
            gr = grads[name]
            fisher = np.kron(fa, fg) + 0.05 * np.eye(fa.shape[0] * fg.shape[0])
            ref[name] = np.linalg.solve(fisher, gr.reshape(-1, order="F")).reshape(gr.shape, order="F")
        refs.append(ref)
    return outs, refs, engine


def test_blocks_are_statistics_with_their_own_inverse_workers() -> None:
    config = KFACConfig(strategy="comm-opt", factor_blocks=BLOCKS, damping=0.05, factor_decay=0.0, kl_clip=None, factor_update_interval=1, inv_update_interval=1)
    engine = Preconditioner(SPECS, config, OPS, SingleProcessCommunicator())
    assert [str(k) for k in engine.stat_keys] == ["fc1/A#0", "fc1/A#1", "fc1/A#2", "fc1/G#0", "fc1/G#1", "emb/A", "emb/G#0", "emb/G#1"]
    assert StatKey.parse("fc1/A#2") == StatKey("fc1", Statistic.A, 2)
    results = ThreadedWorld(4).run(lambda comm: Preconditioner(SPECS, config, OPS, comm).placement)
    workers = {str(k): results[0].inverse_worker(k) for k in engine.stat_keys}
    assert len(set(workers.values())) == 4, f"blocks should spread over the 4 ranks: {workers}"


@pytest.mark.parametrize("strategy", ["comm-opt", "spngd", "mem-opt"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_split_step_is_block_diagonal_kfac_on_any_world(strategy: str, world: int) -> None:
    config = KFACConfig(strategy=strategy, factor_blocks=BLOCKS, damping=0.05, factor_decay=0.0, kl_clip=None, factor_update_interval=1, inv_update_interval=1)
    if world == 1:
        results = [run(SingleProcessCommunicator(), config, 1)]
    else:
        results = ThreadedWorld(world).run(lambda comm: run(comm, config, world))
    for outs, refs, _ in results:
        for out, ref in zip(outs, refs):
            for name in ref:
                np.testing.assert_allclose(out[name], ref[name], rtol=1e-8, atol=1e-10, err_msg=name)


def test_one_block_per_factor_is_exactly_unsplit_kfac() -> None:
    base = dict(strategy="comm-opt", damping=0.05, factor_decay=0.0, kl_clip=None, factor_update_interval=1, inv_update_interval=1)
    split1, _, _ = run(SingleProcessCommunicator(), KFACConfig(factor_blocks={"fc1/A": 1, "fc1/G": 1}, **base), 1)
    whole, _, _ = run(SingleProcessCommunicator(), KFACConfig(**base), 1)
    for a, b in zip(split1, whole):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_splitting_checkpoints_and_rejects_cholesky() -> None:
    config = KFACConfig(strategy="comm-opt", factor_blocks=BLOCKS, damping=0.05, factor_decay=0.0)
    _, _, engine = run(SingleProcessCommunicator(), config, 1)
    state = engine.state_dict()
    assert "fc1/A#1" in state["factors"] and "fc1/A" not in state["factors"]
    fresh = Preconditioner(SPECS, config, OPS, SingleProcessCommunicator())
    fresh.load_state_dict(state, like=np.zeros(1))
    np.testing.assert_array_equal(fresh.factors["fc1/G#1"], engine.factors["fc1/G#1"])
    with pytest.raises(ValueError, match="inverse_method"):
        KFACConfig(factor_blocks=BLOCKS, inverse_method="cholesky")
    with pytest.raises(ValueError, match="factor_blocks"):
        KFACConfig(factor_blocks={"fc1/X": 2})
