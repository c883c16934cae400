"""Rank-consistency checks: every rank must register the same layers with the same config
(``check_consistent``, once at construction) and step with the same hyperparameters
(``check_hyperparameters``, every ``consistency_check_interval`` steps)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from hvd_ngd.communicator import Communicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops.base import Array, ArrayOps


class RankMismatchError(ValueError):
    """Ranks registered different layers or configurations."""


def _describe_layers(specs: Sequence[LayerSpec]) -> List[tuple]:
    return [(s.name, s.kind.value, s.in_features, s.out_features, s.has_bias) for s in specs]


def check_consistent(comm: Communicator, specs: Sequence[LayerSpec], config: KFACConfig) -> None:
    """Compare this rank's layers and config with every other rank's using one collective.

    Raises:
        RankMismatchError: on every rank, naming the first differing layers or config values.
    """
    mine: Any = {"layers": _describe_layers(specs), "config": config.describe()}
    everyone = comm.allgather_object(mine, name="hvd_ngd.consistency")
    reference = everyone[0]
    problems: List[str] = []
    for rank, other in enumerate(everyone[1:], start=1):
        if other["layers"] != reference["layers"]:
            a, b = reference["layers"], other["layers"]
            diffs = [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y][:3]
            detail = "; ".join(f"position {i}: rank 0 has {x}, rank {rank} has {y}" for i, x, y in diffs)
            if len(a) != len(b):
                only0 = sorted({x[0] for x in a} - {y[0] for y in b})
                only_r = sorted({y[0] for y in b} - {x[0] for x in a})
                detail += f"; rank 0 registered {len(a)} layers, rank {rank} {len(b)} (only on rank 0: {only0}, only on rank {rank}: {only_r})"
            problems.append(f"layers differ between rank 0 and rank {rank}: {detail}")
        diff_cfg = {
            k: (reference["config"][k], other["config"].get(k))
            for k in reference["config"]
            if reference["config"][k] != other["config"].get(k)
        }
        if diff_cfg:
            problems.append(
                f"config differs between rank 0 and rank {rank}: "
                + ", ".join(f"{k}: {v0!r} vs {v1!r}" for k, (v0, v1) in diff_cfg.items())
            )
    if problems:
        raise RankMismatchError("hvd_ngd: ranks disagree (every rank must build the same model and config): " + " | ".join(problems))


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def check_hyperparameters(
    comm: Communicator,
    ops: ArrayOps,
    values: Mapping[str, float],
    step: int,
    like: Array = None,
    shared_max: Optional[Mapping[str, float]] = None,
    device_value: Array = None,
) -> Dict[str, float]:
    """Compare this step's hyperparameter values across ranks with one small allgather.

    Every rank sends the same number of float64 values (the names come from the same code on
    every rank), so the collective itself cannot hang on a difference; every rank then finds
    the same differences and raises the same error before any gradient is communicated.

    Args:
        comm: the communicator.
        ops: array backend (builds the tensor the communicator sends).
        values: name -> value, in an order fixed by the code (e.g. ``lr``, ``damping``).
        step: the step, for the message.
        like: a tensor whose device the sent tensor uses (None: the backend's default).
        shared_max: values that may legitimately differ between ranks and are agreed on by
            taking the largest (per-layer damping, which only the ranks that precondition a
            layer escalate); sent in the same allgather, never compared.
        device_value: a 0-d tensor computed on the device (no host read before sending),
            e.g. a finiteness indicator of the local gradients; returned for every rank under
            ``"device_value.r<rank>"``, never compared.

    Returns:
        ``shared_max``'s names with the largest value any rank sent (and the device values).

    Raises:
        RankMismatchError: on every rank, naming each differing value and the ranks' values.
    """
    shared = dict(shared_max or {})
    names = list(values)
    mine = np.array([[float(values[n]) for n in names] + [float(shared[n]) for n in shared]], dtype=np.float64)
    sent = ops.from_numpy(mine, like=like)
    width = len(names) + len(shared)
    if device_value is not None:
        column = ops.reshape(ops.cast(device_value, "float64"), (1, 1))
        sent = ops.concat([sent, column], 1)
        width += 1
    table = np.asarray(ops.to_numpy(comm.allgather(sent, name="hvd_ngd.consistency.hyperparameters")))
    table = table.reshape(comm.size, width)
    merged = {n: float(table[:, len(names) + j].max()) for j, n in enumerate(shared)}
    if device_value is not None:
        merged.update({f"device_value.r{r}": float(table[r, -1]) for r in range(comm.size)})
    table = table[:, : len(names)]
    diffs = [
        (name, [float(v) for v in table[:, j]])
        for j, name in enumerate(names)
        if not all(_same(float(table[0, j]), float(table[r, j])) for r in range(comm.size))
    ]
    if diffs:
        detail = "; ".join(
            f"{name}: " + ", ".join(f"rank {r} has {v:g}" for r, v in enumerate(column)) for name, column in diffs
        )
        raise RankMismatchError(
            f"hvd_ngd: hyperparameters differ across ranks at step {step}: {detail}. Every rank must use the "
            "same values at every step (apply learning-rate and damping schedules identically on every rank, "
            "and take every preconditioned step on every rank)"
        )
    return merged
