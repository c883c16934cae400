"""Elastic Horovod end to end: ``horovodrun`` elastic on localhost, with a host-discovery script
of the test's own that changes its answer when the worker signals.

- Removing one of two workers mid-run: training finishes on 1 rank with every preconditioner
  factor of the committed state (including those the removed rank owned) and continues exactly
  as a 1-rank run from that committed state.
- Adding a worker to a 1-rank job: the new worker builds its preconditioner without any
  collective (Horovod elastic forbids them before ``hvd.elastic.run``), receives the committed
  state at the sync, and both ranks hold their share of every factor of the new plan.
"""

from __future__ import annotations

import json
import os
import signal as signal_module
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest

pytest.importorskip("horovod.torch")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hvd_ngd.torch as ngd  # noqa: E402
from hvd_ngd.communicator import SingleProcessCommunicator  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE))
import elastic_worker as worker  # noqa: E402

STEPS = 40
SIGNAL_AT = 5
TIMEOUT = 150  # seconds per elastic job (about 25 s each on 2 cores)


def horovodrun() -> str:
    found = Path(sys.executable).with_name("horovodrun")
    return str(found) if found.exists() else "horovodrun"


def run_elastic(tmp_path: Path, strategy: str, hosts: Tuple[int, int]) -> str:
    """Start with ``hosts[0]`` slots on localhost; the discovery script answers ``hosts[1]`` once
    the worker has signalled."""
    discover = tmp_path / "discover.sh"
    signal = tmp_path / "change_hosts"
    discover.write_text(
        f"#!/bin/sh\nif [ -f '{signal}' ]; then echo localhost:{hosts[1]}; else echo localhost:{hosts[0]}; fi\n"
    )
    discover.chmod(0o755)
    cmd = [
        horovodrun(), "-np", str(hosts[0]), "--min-np", "1", "--max-np", "2",
        "--host-discovery-script", str(discover), "--network-interface", "lo", "--gloo",
        sys.executable, str(HERE / "elastic_worker.py"), "--out", str(tmp_path), "--steps", str(STEPS),
        "--signal-at", str(SIGNAL_AT), "--signal", signal.name, "--strategy", strategy, "--start-np", str(hosts[0]),
    ]
    env = dict(os.environ, HOROVOD_DYNAMIC_PROCESS_SETS="1", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal_module.SIGKILL)  # horovodrun and its workers
        out, _ = proc.communicate()
        pytest.fail(f"elastic job hung (killed after {TIMEOUT}s):\n{out[-6000:]}")
    assert proc.returncode == 0, f"horovodrun failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def resize_step(tmp_path: Path, before: int, after: int) -> int:
    """The step training resumed from on the new world size (rank 0's log)."""
    sizes = json.loads((tmp_path / "log_rank0.json").read_text())["sizes"]
    assert len(sizes) == STEPS and sizes[0] == before and sizes[-1] == after, sizes
    at = sizes.index(after)
    assert set(sizes[:at]) == {before} and set(sizes[at:]) == {after}, sizes
    return at


def continue_on_one_rank(committed: dict, strategy: str, start: int) -> torch.Tensor:
    """Parameters of a 1-rank run on the whole batches from a committed state."""
    model = worker.model_fn()
    model.load_state_dict(committed["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(committed["opt"])
    kfac = ngd.KFAC(model, reduce_gradients=True, communicator=SingleProcessCommunicator(), strategy=strategy,
                    **worker.CONFIG)
    kfac.load_state_dict(committed["kfac"])
    for x, y in worker.batches(STEPS)[start:]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        kfac.step(lr=0.1)
        opt.step()
    return flat(model.state_dict())


def flat(state_dict: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in state_dict.values()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt"])
def test_remove_a_worker_mid_run(tmp_path: Path, strategy: str) -> None:
    out = run_elastic(tmp_path, strategy, (2, 1))
    assert "has been removed from elastic job" in out, out[-6000:]
    at = resize_step(tmp_path, 2, 1)

    # Factors were not lost: after the reset rank 0 holds every statistic of the state committed
    # on 2 ranks (gathered from both owners), bitwise, and the 2-rank plan had used rank 1.
    committed = torch.load(tmp_path / f"committed_{at}.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed_rank0.pt", weights_only=False)
    engine = committed["kfac"]["engine"]
    assert resumed["step"] == committed["step"] == resumed["steps"] == engine["steps"] == at
    assert resumed["size"] == 1 and set(resumed["owners"].values()) == {0}
    assert resumed["tracker"] == engine["tracker"]
    assert set(resumed["factors"]) == set(engine["factors"])
    for k, v in engine["factors"].items():
        assert (resumed["factors"][k] == v).all(), k

    # The rest of the run equals a 1-rank run continued from the committed state.
    final = torch.load(tmp_path / "final_rank0.pt", weights_only=False)
    assert final["size"] == 1 and final["steps"] == STEPS
    got = flat(final["model"])
    assert torch.isfinite(got).all()
    rel = relative(got, continue_on_one_rank(committed, strategy, at))
    assert rel < 1e-10, f"elastic run differs from the 1-rank continuation by {rel:.2e}"


def test_add_a_worker_mid_run(tmp_path: Path) -> None:
    """1 -> 2 ranks (spngd): the joining worker builds its model while rank 0 synchronises; both
    end with every committed factor between them and the same parameters."""
    run_elastic(tmp_path, "spngd", (1, 2))
    at = resize_step(tmp_path, 1, 2)
    committed = torch.load(tmp_path / f"committed_{at}.pt", weights_only=False)
    engine = committed["kfac"]["engine"]
    parts = [torch.load(tmp_path / f"resumed_rank{r}.pt", weights_only=False) for r in (0, 1)]
    union = {}
    for r, part in enumerate(parts):
        assert part["size"] == 2 and part["step"] == part["steps"] == at and part["tracker"] == engine["tracker"]
        assert all(part["owners"][k.rsplit("/", 1)[0]] == r for k in part["factors"]), "a rank holds another's factor"
        union.update(part["factors"])
    assert set(union) == set(engine["factors"]), "statistics lost when a worker joined"
    for k, v in engine["factors"].items():
        assert (union[k] == v).all(), k
    finals = [torch.load(tmp_path / f"final_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert torch.equal(flat(finals[0]["model"]), flat(finals[1]["model"]))
    assert finals[0]["steps"] == finals[1]["steps"] == STEPS
    # 2 ranks on half batches == 1 rank on the whole batch (float64).
    rel = relative(flat(finals[0]["model"]), continue_on_one_rank(committed, "spngd", at))
    assert rel < 1e-8, f"2-rank continuation differs from the 1-rank one by {rel:.2e}"
