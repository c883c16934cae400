#!/usr/bin/env python3
"""Run hvd_ngd's test phases, each in its own process group with a hard timeout.

Phases (torch and TensorFlow never share a process):
    core          pytest tests/core (numpy only)
    torch         pytest tests/torch, single process
    torch-np2     horovodrun -np 2 pytest tests/torch/distributed -m "not np4"
    torch-np4     horovodrun -np 4 pytest tests/torch/distributed -m np4
    torch-elastic pytest tests/torch/elastic: elastic state without a cluster, then elastic
                  horovodrun jobs (launched by the tests) that remove and add a worker mid-run
    tf            pytest tests/tensorflow, single process
    tf-np2 / tf-np4  the same for tests/tensorflow/distributed
    torch-mpi / tf-mpi  the collectives smoke test and the distributed equivalence tests on 2
                  ranks under the MPI controller (horovodrun --mpi, Open MPI)
    multihost     test hosts host1, host2 made as network namespaces with sshd
                  (scripts/multihost/netns_hosts.py, root only), then
                  horovodrun -H host1:1,host2:1 --gloo over ssh: tests/multihost/distributed and
                  the torch smoke and equivalence tests
    multihost-mpi the same under the MPI controller (mpirun over ssh)
    multihost-elastic  an elastic job on the two hosts whose worker on host2 is killed mid-run
                  and which host2 rejoins (tests/multihost/elastic)

The multihost phases need root (network namespaces); elsewhere they are reported as SKIPPED with
the reason. Their hosts are removed after each phase, also when it fails or hangs.

A phase that hangs is killed with its whole process group and reported as HUNG. The last line
is ``N passed, M failed`` counting tests (rank 0's pytest summary for multi-rank phases).
Usage: scripts/run_tests.py [--only PHASE[,PHASE...]]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"
PY = str(VENV / "python")
HOROVODRUN = str(VENV / "horovodrun")
PYTEST = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=600"]


NETNS_HOSTS = [PY, str(ROOT / "scripts" / "multihost" / "netns_hosts.py")]
SMOKE_AND_EQUIVALENCE = {
    fw: [f"tests/{fw}/distributed/test_collectives_smoke.py", f"tests/{fw}/distributed/test_equivalence.py", "-m", "not np4"]
    for fw in ("torch", "tensorflow")
}


def horovod(np_: int, args: List[str]) -> List[str]:
    return [HOROVODRUN, "-np", str(np_), "-H", f"localhost:{np_}", "--gloo"] + PYTEST + args


def horovod_mpi(hosts: str, args: List[str]) -> List[str]:
    """horovodrun --mpi (Open MPI; horovodrun adds --allow-run-as-root); no tty colours, which
    Open MPI's output tags would split."""
    np_ = sum(int(h.split(":")[1]) for h in hosts.split(","))
    return [HOROVODRUN, "-np", str(np_), "-H", hosts, "--mpi", "--mpi-args=--oversubscribe", "--start-timeout", "120"] \
        + PYTEST + ["--color=no"] + args


def on_test_hosts(cmd: List[str]) -> List[str]:
    """``cmd`` run on host1 of freshly made test hosts host1, host2, which are removed after it."""
    return NETNS_HOSTS + ["run", "--hosts", "2", "--"] + cmd


PHASES: Dict[str, Tuple[List[str], str, int]] = {
    "core": (PYTEST + ["tests/core"], "tests/core", 900),
    "torch": (PYTEST + ["tests/torch", "--ignore=tests/torch/distributed", "--ignore=tests/torch/elastic"], "tests/torch", 900),
    "torch-np2": (horovod(2, ["tests/torch/distributed", "-m", "not np4"]), "tests/torch/distributed", 1500),
    "torch-np4": (horovod(4, ["tests/torch/distributed", "-m", "np4"]), "tests/torch/distributed", 900),
    "torch-elastic": (PYTEST + ["tests/torch/elastic"], "tests/torch/elastic", 600),
    "tf": (PYTEST + ["tests/tensorflow", "--ignore=tests/tensorflow/distributed"], "tests/tensorflow", 900),
    "tf-np2": (horovod(2, ["tests/tensorflow/distributed", "-m", "not np4"]), "tests/tensorflow/distributed", 1500),
    "tf-np4": (horovod(4, ["tests/tensorflow/distributed", "-m", "np4"]), "tests/tensorflow/distributed", 900),
    "torch-mpi": (horovod_mpi("localhost:2", SMOKE_AND_EQUIVALENCE["torch"]), "tests/torch/distributed", 600),
    "tf-mpi": (horovod_mpi("localhost:2", SMOKE_AND_EQUIVALENCE["tensorflow"]), "tests/tensorflow/distributed", 1500),
    "multihost": (
        on_test_hosts([HOROVODRUN, "-np", "2", "-H", "host1:1,host2:1", "--gloo", "--start-timeout", "120"] + PYTEST
                      + ["tests/multihost/distributed"] + SMOKE_AND_EQUIVALENCE["torch"]),
        "tests/multihost/distributed", 600),
    "multihost-mpi": (
        on_test_hosts(horovod_mpi("host1:1,host2:1", ["tests/multihost/distributed"] + SMOKE_AND_EQUIVALENCE["torch"])),
        "tests/multihost/distributed", 600),
    "multihost-elastic": (on_test_hosts(PYTEST + ["tests/multihost/elastic"]), "tests/multihost/elastic", 600),
}

# Phases that make network namespaces: root only, and their hosts are removed after the phase
# (``netns_hosts.py run`` removes them itself, unless it was killed).
NEEDS_ROOT = {"multihost", "multihost-mpi", "multihost-elastic"}
CLEANUP = {name: NETNS_HOSTS + ["down"] for name in NEEDS_ROOT}

SUMMARY = re.compile(r"(?:\[(?:\d+,)?0\]<stdout>:)?=*\s*(.*\b(?:passed|failed|error|errors|deselected|skipped|no tests ran)\b.*) in [\d.]+s")
# Output tags of Gloo (``[1]<stdout>:``) and Open MPI (``[1,1]<stdout>:``), which Open MPI puts
# mid-line when ranks write partial lines.
RANK_TAG = re.compile(r"(?<!^)(?<!\n)(\[(?:\d+,)?\d+\]<std(?:out|err)>:)")
RANK0 = re.compile(r"\[(?:\d+,)?0\]")


def count(output: str) -> Tuple[int, int]:
    """(passed, failed+errors) from the last pytest summary line of rank 0 (or the only rank)."""
    output = RANK_TAG.sub(r"\n\1", output)
    lines = [l for l in output.splitlines() if SUMMARY.search(l) and (RANK0.match(l) or not l.startswith("["))]
    if not lines:
        return 0, 0
    text = SUMMARY.search(lines[-1]).group(1)
    get = lambda word: sum(int(n) for n in re.findall(rf"(\d+) {word}", text))  # noqa: E731
    return get("passed"), get("failed") + get("errors?")


def run_phase(name: str) -> Tuple[str, float, int, int]:
    cmd, path, timeout = PHASES[name]
    if not (ROOT / path).is_dir():
        return "SKIPPED (no tests)", 0.0, 0, 0
    if name in NEEDS_ROOT and os.geteuid() != 0:
        print(f"\n=== {name}: SKIPPED: the test hosts are network namespaces, which need root "
              "(run as root, e.g. sudo make test)", flush=True)
        return "SKIPPED (needs root)", 0.0, 0, 0
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    if name.startswith("tf"):
        env.pop("TF_USE_LEGACY_KERAS", None)  # the TF tests run Keras 3 (tf.keras must not become tf-keras)
    env.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    chunks: List[str] = []
    hung = False
    try:
        out, _ = proc.communicate(timeout=timeout)
        chunks.append(out)
    except subprocess.TimeoutExpired:
        hung = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        chunks.append(out)
    if name in CLEANUP:  # also after a hang, when the phase's own clean-up was killed
        subprocess.run(CLEANUP[name], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = "".join(chunks)
    sys.stdout.write(output)
    elapsed = time.time() - start
    passed, failed = count(output)
    if hung:
        return f"HUNG (killed after {timeout}s)", elapsed, passed, max(failed, 1)
    # pytest exits 5 when nothing was collected or selected; horovodrun reports that as a failure
    # ("Process N exit with status code 5") and terminates the other ranks.
    no_tests = proc.returncode == 5 or (
        proc.returncode != 0 and passed == 0 and failed == 0 and re.search(r"exit with status code 5\b", output)
    )
    if no_tests:
        return "OK (no tests collected)", elapsed, passed, failed
    if proc.returncode != 0:
        return f"FAILED (exit {proc.returncode})", elapsed, passed, max(failed, 1)
    return "OK", elapsed, passed, failed


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated phases from: {', '.join(PHASES)}")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(PHASES)
    unknown = [n for n in names if n not in PHASES]
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {list(PHASES)}")
    results = [(n,) + run_phase(n) for n in names]
    print("\n=== summary")
    print(f"{'phase':<18} {'result':<34} {'seconds':>8} {'passed':>7} {'failed':>7}")
    for name, result, secs, passed, failed in results:
        print(f"{name:<18} {result:<34} {secs:>8.1f} {passed:>7} {failed:>7}")
    total_passed = sum(r[3] for r in results)
    total_failed = sum(r[4] for r in results)
    bad = any(not r[1].startswith(("OK", "SKIPPED")) for r in results)
    print(f"{total_passed} passed, {total_failed} failed")
    return 1 if bad or total_failed else 0


if __name__ == "__main__":
    sys.exit(main())
