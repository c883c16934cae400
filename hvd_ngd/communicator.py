"""The collective-communication interface the core's distribution logic is written against.

Adapters implement it with Horovod (``hvd.allreduce``, ``hvd.reducescatter``, ...); tests inject
``hvd_ngd.testing.ThreadedWorld`` so placement and strategy logic run without a cluster.
"""

from __future__ import annotations

from typing import Any, List, Optional, Protocol, Sequence

Array = Any
Group = Optional[Sequence[int]]  # ranks of a process set; None = every rank


class Handle(Protocol):
    """An in-flight asynchronous collective."""


class Communicator(Protocol):
    """Collectives used by the preconditioner. Every call is made by every rank of ``group``
    in the same order with the same ``name``."""

    @property
    def rank(self) -> int:
        """This process's rank in the global set."""

    @property
    def size(self) -> int:
        """Number of ranks in the global set."""

    def allreduce(self, x: Array, *, name: str, average: bool = True) -> Array:
        """Sum (or average) ``x`` over all ranks."""

    def allreduce_async(self, x: Array, *, name: str, average: bool = True) -> Handle:
        """Start an allreduce; ``wait`` returns its result."""

    def allgather(self, x: Array, *, name: str) -> Array:
        """Concatenate every rank's ``x`` along axis 0 (first dimensions may differ)."""

    def reducescatter(self, x: Array, *, name: str, average: bool = True) -> Array:
        """Reduce ``x`` of shape (size, n) over ranks; rank r receives row r as shape (n,)."""

    def broadcast(self, x: Array, root: int, *, name: str, group: Group = None) -> Array:
        """``root``'s ``x`` on every rank of ``group`` (``root`` is a global rank)."""

    def broadcast_async(self, x: Array, root: int, *, name: str, group: Group = None) -> Handle:
        """Start a broadcast; ``wait`` returns its result."""

    def wait(self, handle: Handle) -> Array:
        """Block until an asynchronous collective finishes and return its result."""

    def allgather_object(self, obj: Any, *, name: str) -> List[Any]:
        """Every rank's picklable ``obj``, in rank order."""


class SingleProcessCommunicator:
    """A world of one rank: every collective is the identity. Useful for reference runs."""

    rank = 0
    size = 1

    def allreduce(self, x: Array, *, name: str, average: bool = True) -> Array:
        return x

    def allreduce_async(self, x: Array, *, name: str, average: bool = True) -> Array:
        return x

    def allgather(self, x: Array, *, name: str) -> Array:
        return x

    def reducescatter(self, x: Array, *, name: str, average: bool = True) -> Array:
        return x[0]

    def broadcast(self, x: Array, root: int, *, name: str, group: Group = None) -> Array:
        return x

    def broadcast_async(self, x: Array, root: int, *, name: str, group: Group = None) -> Array:
        return x

    def wait(self, handle: Array) -> Array:
        return handle

    def allgather_object(self, obj: Any, *, name: str) -> List[Any]:
        return [obj]
