"""A non-finite gradient on one rank makes every rank skip the update and fold nothing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from hvd_ngd import capture
from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.engine.preconditioner import NonFiniteGradientWarning
from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops import NumpyOps
from hvd_ngd.preconditioner import Preconditioner
from hvd_ngd.testing import ThreadedWorld

OPS = NumpyOps()
SPECS = [LayerSpec("fc1", LayerKind.LINEAR, 4, 3, True), LayerSpec("ln", LayerKind.LAYERNORM, 3, 3, True)]
SHAPES = {"fc1": (3, 5), "ln": (2, 3)}


def train(comm, config: KFACConfig, poison_rank: int, poison_step: int, steps: int = 4):
    engine = Preconditioner(SPECS, config, OPS, comm)
    rng = np.random.default_rng(7)  # identical data on every rank: results must agree exactly
    seen = []
    if True:
        for step in range(steps):
            plan = engine.capture_plan()
            a, g = rng.normal(size=(4, 4)), rng.normal(size=(4, 3))
            x, gn = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 3, 2))
            if "A" in plan.get("fc1", ()):
                engine.accumulate("fc1", "A", capture.a_statistic(OPS, SPECS[0], a))
                engine.accumulate("fc1", "G", capture.g_statistic(OPS, SPECS[0], g, 4.0))
            if "F" in plan.get("ln", ()):
                engine.accumulate("ln", "F", capture.f_statistic(OPS, SPECS[1], x, gn, 4.0))
            grads = {n: rng.normal(size=s) for n, s in SHAPES.items()}
            if comm.rank == poison_rank and step == poison_step:
                grads["fc1"][1, 2] = np.nan
            before = {k: np.array(v) for k, v in engine.factors.items()}
            pgrads, _ = engine.reduce_and_step(grads, [rng.normal(size=2)], reduce_gradients=True)
            seen.append((engine.last_step_skipped, engine.steps, before, {k: np.array(v) for k, v in engine.factors.items()},
                         {k: np.array(v) for k, v in pgrads.items()}))
    return seen, engine.skips, engine.skipped_steps


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt", "mem-opt"])
@pytest.mark.parametrize("check_interval", [1, 0])
def test_every_rank_skips_the_poisoned_step(strategy: str, check_interval: int) -> None:
    config = KFACConfig(strategy=strategy, damping=0.01, consistency_check_interval=check_interval)
    with warnings.catch_warnings(record=True) as caught:  # threads share the warnings registry
        warnings.simplefilter("always")
        results = ThreadedWorld(2).run(lambda comm: train(comm, config, poison_rank=1, poison_step=1))
    messages = [str(w.message) for w in caught if issubclass(w.category, NonFiniteGradientWarning)]
    assert len(messages) == 2 and all("at step 1" in m for m in messages), messages
    for seen, skips, skipped in results:
        assert skipped == 1 and [s[0] for s in seen] == [False, True, False, False]
        assert [s[1] for s in seen] == [1, 1, 2, 3], "a skipped step does not advance the schedule"
        _, _, before, after, _ = seen[1]
        assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before), \
            "the skipped step folded statistics"
        if check_interval:  # carried in the consistency allgather: the rank is known
            assert skips == [(1, [1])] and all("rank(s) 1" in m for m in messages), messages
        else:  # one 1-element allreduce: which rank is not known
            assert skips == [(1, [0, 1])] and all("some rank" in m or "not known" in m for m in messages), messages
        for s in (seen[2], seen[3]):
            assert all(np.isfinite(v).all() for v in s[4].values())
    for step in (2, 3):  # ranks stay identical after the skip
        for name in SHAPES:
            np.testing.assert_array_equal(results[0][0][step][4][name], results[1][0][step][4][name])


def test_one_process_skips_and_can_be_disabled() -> None:
    with pytest.warns(NonFiniteGradientWarning, match=r"non-finite gradients on rank\(s\) 0 at step 2: every rank skips"):
        seen, skips, skipped = train(SingleProcessCommunicator(), KFACConfig(damping=0.01), 0, 2)
    assert skipped == 1 and seen[2][0] and skips == [(2, [0])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seen, skips, skipped = train(SingleProcessCommunicator(), KFACConfig(damping=0.01, skip_nonfinite_steps=False), 0, 2)
    assert skipped == 0 and not any(s[0] for s in seen)
