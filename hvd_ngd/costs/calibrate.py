"""Measure a ``CostModel`` on the running machine in a few seconds, and cache it as JSON.

``calibrate`` times decompositions (``ArrayOps.eigh`` or ``cholesky_inverse``) of random SPD
matrices and block-Kronecker preconditioning (``blocks.precondition_block_kronecker``, k = 1 and
k = 4, square and 1:4) and unit-wise 2x2 solves (16 n units) per size, each the fastest of a few repeats, and fits the coefficients by non-negative
least squares on relative error (every size counts alike). ``calibrate_collective`` times
allreduces on a communicator. ``load_or_calibrate`` reuses a cached model when the file's
fingerprint (backend, device, dtype, method, machine, library versions) matches.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, List, Sequence, Tuple

import numpy as np

from hvd_ngd.blocks import block_layout, precondition_block_kronecker
from hvd_ngd.costs.model import CostModel
from hvd_ngd.enums import InverseMethod
from hvd_ngd.inverse import FactorInverse
from hvd_ngd.ops.base import Array, ArrayOps
from hvd_ngd.unitwise import unitwise_precondition

DEFAULT_SIZES: Tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One timed piece of work: ``kind`` 'inverse' (params n), 'precondition' (g, a, k) or
    'unitwise' (units)."""

    kind: str
    params: Tuple[int, ...]
    seconds: float


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A fitted model and the measurements it was fitted to."""

    model: CostModel
    measurements: Tuple[Measurement, ...]

    def relative_errors(self) -> List[float]:
        """(predicted - measured) / measured for every measurement."""
        out = []
        for m in self.measurements:
            out.append((_predict(self.model, m) - m.seconds) / m.seconds)
        return out


def _predict(model: CostModel, m: Measurement) -> float:
    if m.kind == "inverse":
        return model.inverse_seconds(m.params[0])
    if m.kind == "unitwise":
        return model.unitwise_seconds(m.params[0])
    g, a, k = m.params
    return model.precondition_seconds(block_layout(g, k).sizes, block_layout(a, k).sizes)


def time_call(
    fn: Callable[[], Any], min_time: float = 0.05, max_repeats: int = 5, timer: Callable[[], float] = time.perf_counter
) -> float:
    """Fastest of up to ``max_repeats`` calls (at least 2, stopping once ``min_time`` is spent).

    ``fn`` must block until its work is done (see ``_sync``). ``timer``: wall clock by default;
    ``time.thread_time`` counts only this thread's CPU time (single-threaded BLAS on a shared
    machine, where other processes would otherwise be timed too; never for GPU work).
    """
    fn()  # warm-up: allocation, library initialisation, kernel selection
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 2 or (runs < max_repeats and spent < min_time):
        start = timer()
        fn()
        elapsed = timer() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def fit_nonnegative(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Coefficients x >= 0 minimising sum(((features @ x) - seconds) / seconds)^2.

    A small active-set loop over numpy's least squares: a feature whose coefficient comes out
    negative is dropped (fixed at 0) and the rest refitted.

    Raises:
        ValueError: shapes that disagree, or non-positive times.
    """
    features = np.asarray(features, dtype=np.float64)
    seconds = np.asarray(seconds, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] != seconds.shape[0] or seconds.ndim != 1:
        raise ValueError(f"fit_nonnegative: features {features.shape} and seconds {seconds.shape} disagree")
    if np.any(seconds <= 0):
        raise ValueError("fit_nonnegative: every measured time must be > 0")
    weighted = features / seconds[:, None]
    active = list(range(features.shape[1]))
    coef = np.zeros(features.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(weighted[:, active], np.ones(len(seconds)), rcond=None)
        if np.all(sol >= 0):
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


def _sync(ops: ArrayOps, x: Array) -> None:
    """Block until ``x`` is computed (a host read of one number)."""
    ops.to_float(ops.sum(ops.flatten(x)))


def _spd(ops: ArrayOps, like: Array, n: int, dtype: str, rng: np.random.Generator) -> Array:
    x = rng.normal(size=(n, n))
    return ops.cast(ops.from_numpy(x @ x.T / n + np.eye(n), like), dtype)


def _random_inverses(
    ops: ArrayOps, like: Array, sizes: Sequence[int], method: InverseMethod, dtype: str, rng: np.random.Generator
) -> List[FactorInverse]:
    out = []
    for s in sizes:
        mat = ops.cast(ops.from_numpy(rng.normal(size=(s, s)), like), dtype)
        if method is InverseMethod.EIGEN:
            vals = ops.cast(ops.from_numpy(rng.uniform(0.1, 1.0, size=s), like), dtype)
            out.append(FactorInverse(method, eigvals=vals, eigvecs=mat))
        else:
            out.append(FactorInverse(method, inverse=mat))
    return out


def calibrate(
    ops: ArrayOps,
    like: Array,
    method: InverseMethod = InverseMethod.EIGEN,
    sizes: Sequence[int] = DEFAULT_SIZES,
    dtype: str = "float32",
    device: str = "",
    seed: int = 0,
    timer: Callable[[], float] = time.perf_counter,
) -> Calibration:
    """Time and fit a ``CostModel`` for ``ops`` on ``like``'s device (about 1-5 s on a CPU).

    Args:
        ops: array backend (numpy here; the adapters pass theirs).
        like: any array of the backend on the target device.
        method: EIGEN (times eigh) or CHOLESKY (times the Cholesky inverse).
        sizes: factor sides to time (at least 3); preconditioning is timed on n x n gradients
            with 1 and 4 blocks per factor and on (n/4) x n gradients.
        dtype: element type of the timed work.
        device: a description stored in the model.
        seed: seed of the random matrices.
        timer: clock of ``time_call`` (wall by default).

    Raises:
        ValueError: fewer than 3 distinct sizes, or a size < 4.
    """
    method = InverseMethod(method)
    sizes = sorted(set(int(s) for s in sizes))
    if len(sizes) < 3 or sizes[0] < 4:
        raise ValueError(f"calibrate: sizes={sizes} needs at least 3 distinct sides, each >= 4")
    rng = np.random.default_rng(seed)
    measurements: List[Measurement] = []
    for n in sizes:
        x = _spd(ops, like, n, dtype, rng)
        if method is InverseMethod.EIGEN:
            seconds = time_call(lambda: _sync(ops, ops.eigh(x)[0]), timer=timer)
        else:
            seconds = time_call(lambda: _sync(ops, ops.cholesky_inverse(x)), timer=timer)
        measurements.append(Measurement("inverse", (n,), seconds))
    for n in sizes:
        for g, a, k in ((n, n, 1), (n, n, 4), (max(4, n // 4), n, 1)):
            la, lg = block_layout(a, k), block_layout(g, k)
            grad = ops.cast(ops.from_numpy(rng.normal(size=(g, a)), like), dtype)
            a_inv = _random_inverses(ops, like, la.sizes, method, dtype, rng)
            g_inv = _random_inverses(ops, like, lg.sizes, method, dtype, rng)
            seconds = time_call(lambda: _sync(ops, precondition_block_kronecker(ops, grad, la, a_inv, lg, g_inv, 1e-3)), timer=timer)
            measurements.append(Measurement("precondition", (g, a, k), seconds))
    for n in sizes:
        units = 16 * n
        fisher = ops.cast(ops.from_numpy(np.abs(rng.normal(size=(units, 3))) + [1.0, 0.0, 1.0], like), dtype)
        vec = ops.cast(ops.from_numpy(rng.normal(size=units), like), dtype)
        seconds = time_call(lambda: _sync(ops, unitwise_precondition(ops, fisher, vec, vec, 1e-3)[0]), timer=timer)
        measurements.append(Measurement("unitwise", (units,), seconds))
    inv = [m for m in measurements if m.kind == "inverse"]
    inverse = fit_nonnegative(np.array([[m.params[0] ** 3, m.params[0] ** 2, 1.0] for m in inv]),
                              np.array([m.seconds for m in inv]))
    pre = [m for m in measurements if m.kind == "precondition"]
    rows = []
    for m in pre:
        g, a, k = m.params
        probe = CostModel(method, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0))
        flops = probe.precondition_seconds(block_layout(g, k).sizes, block_layout(a, k).sizes)
        rows.append([flops, g * a, 2.0 * k, 1.0])
    precondition = fit_nonnegative(np.array(rows), np.array([m.seconds for m in pre]))
    uw = [m for m in measurements if m.kind == "unitwise"]
    unitwise = fit_nonnegative(np.array([[m.params[0], 1.0] for m in uw]), np.array([m.seconds for m in uw]))
    model = CostModel(method, tuple(inverse), tuple(precondition), tuple(unitwise), None, ops.name, device, dtype)
    return Calibration(model, tuple(measurements))


def calibrate_collective(
    comm: Any, ops: ArrayOps, like: Array, sizes_bytes: Sequence[int] = (1 << 12, 1 << 16, 1 << 20, 1 << 22)
) -> Tuple[float, float]:
    """(latency seconds, seconds per byte) of an averaging allreduce of float32 buffers.

    A collective: every rank of ``comm`` must call it with the same sizes. The fit is the
    non-negative least squares line through the fastest of a few allreduces per size.
    """
    sizes = sorted(set(int(s) for s in sizes_bytes))
    if len(sizes) < 2 or sizes[0] < 4:
        raise ValueError(f"calibrate_collective: sizes_bytes={sizes} needs at least 2 sizes >= 4 bytes")
    times = []
    for i, nbytes in enumerate(sizes):
        buf = ops.cast(ops.zeros((nbytes // 4,), like), "float32")
        name = f"hvd_ngd.calibrate.{i}"
        times.append(time_call(lambda: _sync(ops, comm.allreduce(buf, name=name, average=True)), max_repeats=5))
    coef = fit_nonnegative(np.array([[1.0, float(s)] for s in sizes]), np.array(times))
    return float(coef[0]), float(coef[1])


def shared_model(comm: Any, model: CostModel, root: int = 0) -> CostModel:
    """Rank ``root``'s model on every rank (a collective).

    Each rank times its own calibration, and timings differ; plans computed from different
    models differ too, and every rank must compute the same plan. Call this before planning.
    """
    models = comm.allgather_object(model.to_dict(), name="hvd_ngd.cost_model")
    return CostModel.from_dict(models[root])
