"""What both adapters' Horovod communicators share: ranks, process sets and byte accounting.

The framework module (``horovod.torch`` or ``horovod.tensorflow``) is injected, so this file
imports neither torch nor tensorflow (only ``horovod.common``); ``hvd_ngd.torch.communicator``
and ``hvd_ngd.tensorflow.communicator`` add the tensor collectives.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from horovod.common import process_sets as _process_sets


class HorovodCommunicatorBase:
    """Ranks, process sets and modelled bytes for a Horovod framework module.

    Process sets must exist before they are used. ``register_groups`` adds them on every rank
    in the same order with ``hvd.add_process_set``, which needs dynamic process sets
    (``HOROVOD_DYNAMIC_PROCESS_SETS=1`` before ``hvd.init()``), unless the user already passed
    equal process sets to ``hvd.init(process_sets=...)``.

    Args:
        hvd: the initialised framework module (``horovod.torch`` or ``horovod.tensorflow``).
        package: the adapter's name, for the error message when Horovod is not initialised.

    Attributes:
        bytes_sent: modelled bytes this rank sent (ring algorithms), for benchmarks.

    Raises:
        RuntimeError: ``hvd.init()`` was not called.
    """

    def __init__(self, hvd: Any, package: str) -> None:
        if not hvd.is_initialized():
            raise RuntimeError(f"{package} needs horovod: call hvd.init() before creating the preconditioner")
        self.hvd = hvd
        self._sets: Dict[Tuple[int, ...], Any] = {}
        self.bytes_sent = 0

    @property
    def rank(self) -> int:
        return int(self.hvd.rank())

    @property
    def size(self) -> int:
        return int(self.hvd.size())

    def register_groups(self, groups: Sequence[Sequence[int]]) -> None:
        """Create (or find) a process set for every group that is neither a singleton nor the world.

        Raises:
            RuntimeError: a set is needed but dynamic process sets are off.
        """
        existing = {tuple(sorted(ps.ranks)): ps for ps in known_process_sets()}
        for group in groups:
            key = tuple(sorted(group))
            if len(key) <= 1 or len(key) == self.size or key in self._sets:
                continue
            if key in existing:
                self._sets[key] = existing[key]
                continue
            try:
                self._sets[key] = self.hvd.add_process_set(list(key))
            except ValueError as exc:  # horovod raises ValueError when dynamic sets are off
                raise RuntimeError(
                    f"hvd_ngd needs the Horovod process set {list(key)} for its gradient-worker groups: "
                    "set HOROVOD_DYNAMIC_PROCESS_SETS=1 before hvd.init(), or pass these process sets "
                    "to hvd.init(process_sets=...)"
                ) from exc

    def reset(self) -> None:
        """Forget the cached process sets: Horovod dropped them when it re-initialised (an
        elastic reset); ``register_groups`` adds the new world's sets again."""
        self._sets.clear()

    def process_set(self, group: Optional[Sequence[int]]) -> Any:
        """The Horovod process set of ``group`` (None or every rank: the global set)."""
        if group is None or len(group) == self.size:
            return self.hvd.global_process_set
        return self._sets[tuple(sorted(group))]

    def count(self, elements: int, itemsize: int, factor: float) -> None:
        """Add the bytes this rank sends for a ring algorithm moving ``factor`` times a tensor."""
        self.bytes_sent += int(elements * itemsize * factor)

    def ring_allreduce_factor(self) -> float:
        """Share of a tensor each rank sends in a ring allreduce (reduce-scatter + all-gather)."""
        return 2.0 * (self.size - 1) / self.size

    def ring_share(self, members: Optional[int] = None) -> float:
        """Share each rank sends in a ring reduce-scatter, all-gather or pipelined broadcast."""
        n = self.size if members is None else members
        return (n - 1) / n

    def allgather_object(self, obj: Any, *, name: str) -> List[Any]:
        """Every rank's picklable ``obj``, in rank order."""
        return self.hvd.allgather_object(obj, name=name)

    def broadcast_object(self, obj: Any, root: int, *, name: str) -> Any:
        """``root``'s picklable ``obj`` on every rank (``root`` is a global rank)."""
        return self.hvd.broadcast_object(obj, root_rank=root, name=name)


def known_process_sets() -> List[Any]:
    """Process sets Horovod already has (from ``hvd.init(process_sets=...)`` or an earlier
    preconditioner: Horovod refuses to add a set twice), best effort via Horovod internals."""
    try:
        out = []
        for set_id, ranks in _process_sets._basics._get_process_set_ids_and_ranks().items():
            if set_id == 0:
                continue
            ps = _process_sets._temp_process_set_object(set_id)
            ps.ranks = sorted(ranks)
            out.append(ps)
        return out
    except Exception:  # pragma: no cover - internal API may move
        return []
