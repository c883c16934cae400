"""The protocol every distribution strategy implements, and what it may use of the engine."""

from __future__ import annotations

import abc
import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from hvd_ngd.blocks.base import CurvatureBlock
from hvd_ngd.communicator import Communicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.engine.curvature import Curvature
from hvd_ngd.engine.placement import Placement
from hvd_ngd.engine.schedule import Schedule
from hvd_ngd.engine.state import EngineState
from hvd_ngd.engine.statistics import BatchStatistics
from hvd_ngd.engine.wire_codec import WireCodec
from hvd_ngd.keys import StatKey
from hvd_ngd.ops.base import Array, ArrayOps


@dataclasses.dataclass
class EngineContext:
    """The engine's parts a strategy works with (built once per world by the engine)."""

    ops: ArrayOps
    comm: Communicator
    config: KFACConfig
    blocks: Mapping[str, CurvatureBlock]
    layer_order: List[str]
    placement: Placement
    schedule: Schedule
    state: EngineState
    curvature: Curvature
    codec: WireCodec
    statistics: BatchStatistics


class DistributionStrategy(abc.ABC):
    """How factors, inverses and gradients move between ranks in one step.

    Attributes:
        reduces_gradients: the strategy takes local gradients and averages them itself
            (SP-NGD's reduce-scatter); otherwise ``step`` gets gradients already averaged.
        inverted_keys: the inverses whose schedule this rank consults at every step (the
            stale-statistics counts of a step with nothing due).
    """

    reduces_gradients: bool = False

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.inverted_keys: List[StatKey] = []  # the inverses this rank asks about at every step

    def on_statistic(self, key: StatKey, value: Array) -> None:
        """A statistic was captured for the first time this step (hook time). Default: nothing."""

    @abc.abstractmethod
    def step(self, grads: Mapping[str, Array], other_grads: Sequence[Array]) -> Tuple[Dict[str, Array], List[Array]]:
        """Precondition one step's gradients.

        Args:
            grads: layer -> gradient matrix (local for ``reduces_gradients``, else averaged).
            other_grads: gradients of parameters that are not preconditioned (averaged here
                only by strategies that ``reduces_gradients``).

        Returns:
            Preconditioned (KL-clipped) gradient matrices on every rank, and the other gradients.
        """

    def discard(self, wait: bool = False) -> None:
        """Drop what was started for a step that will not be taken (``wait``: complete its
        collectives first, when every rank skips the step alike). Default: nothing."""

    def pending_inverses(self) -> Dict[StatKey, List[Array]]:
        """Inverses computed but not yet installed (stale-inverse mode), completed. Default: none."""
        return {}

    def load_pending(self, pending: Mapping[StatKey, List[Array]]) -> None:
        """Restore ``pending_inverses`` output. Default: nothing to restore."""


def average_fused(ctx: EngineContext, tensors: List[Array], tag: str) -> List[Array]:
    """Average tensors over all ranks in buckets of at most ``fusion_threshold_bytes``."""
    from hvd_ngd import wire

    ops = ctx.ops
    out: List[Array] = [None] * len(tensors)
    if not tensors:
        return out
    sizes = [nbytes(ops, t) for t in tensors]
    for k, idx in enumerate(wire.bucket(sizes, ctx.config.fusion_threshold_bytes)):
        buf, layout = wire.fuse(ops, [tensors[i] for i in idx])
        buf = ctx.comm.allreduce(buf, name=f"hvd_ngd.{tag}.{k}.{ops.shape(buf)[0]}", average=True)
        for i, t in zip(idx, wire.unfuse(ops, buf, layout)):
            out[i] = t
    return out


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def nbytes(ops: ArrayOps, x: Array) -> int:
    """Size of a tensor in bytes."""
    n = 1
    for d in ops.shape(x):
        n *= d
    return n * _ITEMSIZE.get(ops.dtype_name(x), 4)


def changes_vector(ctx: EngineContext, keys: Sequence[StatKey], changes: Mapping[StatKey, Optional[Array]], like: Array) -> Array:
    """Relative changes of refreshed statistics as one vector for the step's read: inf for a
    statistic without a previous value, -1 for one that was not folded (non-finite)."""
    ops = ctx.ops
    dtype = ops.dtype_name(like)
    parts = []
    for key in keys:
        if key not in changes:
            parts.append(ops.from_numpy(np.asarray([-1.0], dtype=dtype), like))
        elif changes[key] is None:
            parts.append(ops.from_numpy(np.asarray([np.inf], dtype=dtype), like))
        else:
            parts.append(ops.reshape(ops.cast(changes[key], dtype), (1,)))
    return ops.concat(parts, 0)
