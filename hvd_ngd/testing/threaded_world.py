"""An in-process world of N ranks running in threads, with numpy collectives.

It lets the core's distribution logic (placement, strategies, stale inverses) be tested
against a single-process reference without Horovod. Collectives match calls by order, and
each call checks that every participant used the same ``name`` (a mismatch raises instead of
hanging, like Horovod's own coordinator would report).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


class _Exchange:
    """One rendezvous point per group: all members deposit, then all read."""

    def __init__(self, members: Tuple[int, ...]) -> None:
        self.members = members
        self.barrier = threading.Barrier(len(members), timeout=60)
        self.slots: Dict[int, Tuple[str, Any]] = {}
        self.lock = threading.Lock()

    def exchange(self, rank: int, name: str, value: Any) -> Dict[int, Any]:
        with self.lock:
            self.slots[rank] = (name, value)
        self.barrier.wait()
        snapshot = dict(self.slots)
        names = {n for n, _ in snapshot.values()}
        self.barrier.wait()
        if len(names) != 1:
            raise RuntimeError(f"mismatched collectives across ranks {self.members}: {sorted(names)}")
        return {r: v for r, (_, v) in snapshot.items()}


class ThreadedWorld:
    """A world of ``size`` ranks; ``run(fn)`` calls ``fn(comm)`` on every rank in a thread."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._exchanges: Dict[Tuple[int, ...], _Exchange] = {}
        self._lock = threading.Lock()

    def exchange_for(self, group: Sequence[int]) -> _Exchange:
        key = tuple(sorted(group))
        with self._lock:
            if key not in self._exchanges:
                self._exchanges[key] = _Exchange(key)
            return self._exchanges[key]

    def run(self, fn: Callable[["ThreadedCommunicator"], Any]) -> List[Any]:
        """Run ``fn`` on every rank; return results in rank order, re-raising the first error."""
        results: List[Any] = [None] * self.size
        errors: List[Optional[BaseException]] = [None] * self.size

        def target(rank: int) -> None:
            try:
                results[rank] = fn(ThreadedCommunicator(self, rank))
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors[rank] = exc
                for ex in list(self._exchanges.values()):
                    ex.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for err in errors:
            if err is not None and not isinstance(err, threading.BrokenBarrierError):
                raise err
        for err in errors:
            if err is not None:
                raise err
        return results


class ThreadedCommunicator:
    """``Communicator`` for one rank of a ``ThreadedWorld`` (numpy arrays)."""

    def __init__(self, world: ThreadedWorld, rank: int) -> None:
        self.world = world
        self._rank = rank
        self.bytes_sent = 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self.world.size

    def _all(self) -> Tuple[int, ...]:
        return tuple(range(self.world.size))

    def allreduce(self, x: Any, *, name: str, average: bool = True) -> Any:
        self.bytes_sent += np.asarray(x).nbytes
        values = self.world.exchange_for(self._all()).exchange(self._rank, name, np.array(x))
        total = values[0].copy()
        for r in range(1, self.size):
            total = total + values[r]
        return total / self.size if average else total

    def allreduce_async(self, x: Any, *, name: str, average: bool = True) -> Any:
        """Completed at once (ranks call collectives in the same order, so this cannot deadlock)."""
        return self.allreduce(x, name=name, average=average)

    def allgather(self, x: Any, *, name: str) -> Any:
        self.bytes_sent += np.asarray(x).nbytes
        values = self.world.exchange_for(self._all()).exchange(self._rank, name, np.array(x))
        return np.concatenate([values[r] for r in range(self.size)], axis=0)

    def reducescatter(self, x: Any, *, name: str, average: bool = True) -> Any:
        arr = np.array(x)
        if arr.shape[0] != self.size:
            raise ValueError(f"reducescatter needs a leading dimension of {self.size}, got {arr.shape}")
        self.bytes_sent += arr.nbytes
        total = self.allreduce_nocount(arr, name)
        row = total[self._rank]
        return row / self.size if average else row

    def allreduce_nocount(self, arr: Any, name: str) -> Any:
        values = self.world.exchange_for(self._all()).exchange(self._rank, name, arr)
        total = values[0].copy()
        for r in range(1, self.size):
            total = total + values[r]
        return total

    def broadcast(self, x: Any, root: int, *, name: str, group: Optional[Sequence[int]] = None) -> Any:
        members = tuple(sorted(group)) if group is not None else self._all()
        if self._rank not in members or root not in members:
            raise ValueError(f"rank {self._rank} / root {root} not in broadcast group {members}")
        if self._rank == root:
            self.bytes_sent += np.asarray(x).nbytes * (len(members) - 1)
        values = self.world.exchange_for(members).exchange(self._rank, name, np.array(x))
        return values[root].copy()

    def broadcast_async(self, x: Any, root: int, *, name: str, group: Optional[Sequence[int]] = None) -> Any:
        return self.broadcast(x, root, name=name, group=group)

    def wait(self, handle: Any) -> Any:
        return handle

    def allgather_object(self, obj: Any, *, name: str) -> List[Any]:
        values = self.world.exchange_for(self._all()).exchange(self._rank, name, obj)
        return [values[r] for r in range(self.size)]
