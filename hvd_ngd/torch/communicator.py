"""``hvd_ngd.communicator.Communicator`` implemented with ``horovod.torch`` collectives."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import horovod.torch as hvd
import torch


class HorovodCommunicator:
    """Horovod collectives on torch tensors; groups map to ``hvd.ProcessSet``s.

    Process sets must exist before they are used. ``register_groups`` adds them on every rank
    in the same order with ``hvd.add_process_set``, which needs dynamic process sets
    (``HOROVOD_DYNAMIC_PROCESS_SETS=1`` before ``hvd.init()``), unless the user already passed
    equal process sets to ``hvd.init(process_sets=...)``.
    """

    def __init__(self) -> None:
        if not hvd.is_initialized():
            raise RuntimeError("hvd_ngd.torch needs horovod: call hvd.init() before creating the preconditioner")
        self._sets: Dict[Tuple[int, ...], Any] = {}
        self.bytes_sent = 0  # modelled bytes this rank sends (ring algorithms), for benchmarks

    @property
    def rank(self) -> int:
        return hvd.rank()

    @property
    def size(self) -> int:
        return hvd.size()

    def register_groups(self, groups: Sequence[Sequence[int]]) -> None:
        """Create (or find) a process set for every group that is neither a singleton nor the world."""
        existing = {tuple(sorted(ps.ranks)): ps for ps in _known_process_sets()}
        for group in groups:
            key = tuple(sorted(group))
            if len(key) <= 1 or len(key) == self.size or key in self._sets:
                continue
            if key in existing:
                self._sets[key] = existing[key]
                continue
            try:
                self._sets[key] = hvd.add_process_set(list(key))
            except ValueError as exc:  # horovod raises ValueError when dynamic sets are off
                raise RuntimeError(
                    f"hvd_ngd needs the Horovod process set {list(key)} for its gradient-worker groups: "
                    "set HOROVOD_DYNAMIC_PROCESS_SETS=1 before hvd.init(), or pass these process sets "
                    "to hvd.init(process_sets=...)"
                ) from exc

    def _process_set(self, group: Optional[Sequence[int]]) -> Any:
        if group is None or len(group) == self.size:
            return hvd.global_process_set
        return self._sets[tuple(sorted(group))]

    def _count(self, x: torch.Tensor, factor: float) -> None:
        """Add the bytes this rank sends for a ring algorithm moving ``factor`` times ``x``."""
        self.bytes_sent += int(x.numel() * x.element_size() * factor)

    def allreduce(self, x: torch.Tensor, *, name: str, average: bool = True) -> torch.Tensor:
        self._count(x, 2.0 * (self.size - 1) / self.size)  # ring: reduce-scatter + all-gather
        return hvd.allreduce(x.contiguous(), name=name, op=hvd.Average if average else hvd.Sum)

    def allreduce_async(self, x: torch.Tensor, *, name: str, average: bool = True) -> Any:
        self._count(x, 2.0 * (self.size - 1) / self.size)
        return hvd.allreduce_async(x.contiguous(), name=name, op=hvd.Average if average else hvd.Sum)

    def allgather(self, x: torch.Tensor, *, name: str) -> torch.Tensor:
        out = hvd.allgather(x.contiguous(), name=name)
        self._count(out, (self.size - 1) / self.size)  # ring: every rank forwards n-1 blocks
        return out

    def reducescatter(self, x: torch.Tensor, *, name: str, average: bool = True) -> torch.Tensor:
        self._count(x, (self.size - 1) / self.size)
        out = hvd.reducescatter(x.contiguous(), name=name, op=hvd.Average if average else hvd.Sum)
        return out.reshape(x.shape[1:])

    def broadcast(self, x: torch.Tensor, root: int, *, name: str, group: Optional[Sequence[int]] = None) -> torch.Tensor:
        return self.wait(self.broadcast_async(x, root, name=name, group=group))

    def broadcast_async(self, x: torch.Tensor, root: int, *, name: str, group: Optional[Sequence[int]] = None) -> Any:
        members = len(group) if group is not None else self.size
        self._count(x, (members - 1) / members)  # pipelined ring broadcast, per rank on average
        return hvd.broadcast_async(x.contiguous(), root, name=name, process_set=self._process_set(group))

    def wait(self, handle: Any) -> torch.Tensor:
        """Result of an asynchronous collective (a tensor is returned as it is)."""
        return handle if torch.is_tensor(handle) else hvd.synchronize(handle)

    def allgather_object(self, obj: Any, *, name: str) -> List[Any]:
        return hvd.allgather_object(obj, name=name)


def _known_process_sets() -> List[Any]:
    """Process sets Horovod already knows (those given to ``hvd.init``), best effort."""
    try:
        from horovod.common import process_sets as ps_module

        return [ps for ps in getattr(ps_module, "_id_to_process_sets", {}).values() if ps.ranks]
    except Exception:  # pragma: no cover - internal API may move
        return []
