"""``hvd_ngd.communicator.Communicator`` implemented with ``horovod.tensorflow`` (eager)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import horovod.tensorflow as hvd
import tensorflow as tf


class HorovodCommunicator:
    """Horovod collectives on TF tensors. horovod.tensorflow has no asynchronous broadcast or
    allreduce in eager mode, so the ``*_async`` calls complete at once and ``wait`` returns the
    result."""

    def __init__(self) -> None:
        if not hvd.is_initialized():
            raise RuntimeError("hvd_ngd.tensorflow needs horovod: call hvd.init() before creating the preconditioner")
        self._sets: Dict[Tuple[int, ...], Any] = {}
        self.bytes_sent = 0

    @property
    def rank(self) -> int:
        return hvd.rank()

    @property
    def size(self) -> int:
        return hvd.size()

    def register_groups(self, groups: Sequence[Sequence[int]]) -> None:
        """Create a process set for every group that is neither a singleton nor the world."""
        for group in groups:
            key = tuple(sorted(group))
            if len(key) <= 1 or len(key) == self.size or key in self._sets:
                continue
            try:
                self._sets[key] = hvd.add_process_set(list(key))
            except ValueError as exc:
                raise RuntimeError(
                    f"hvd_ngd needs the Horovod process set {list(key)}: set HOROVOD_DYNAMIC_PROCESS_SETS=1 "
                    "before hvd.init()"
                ) from exc

    def _process_set(self, group: Optional[Sequence[int]]) -> Any:
        if group is None or len(group) == self.size:
            return hvd.global_process_set
        return self._sets[tuple(sorted(group))]

    def _count(self, x: tf.Tensor, factor: float) -> None:
        self.bytes_sent += int(int(tf.size(x)) * x.dtype.size * factor)

    def allreduce(self, x: tf.Tensor, *, name: str, average: bool = True) -> tf.Tensor:
        self._count(x, 2.0 * (self.size - 1) / self.size)
        return hvd.allreduce(x, name=name, op=hvd.Average if average else hvd.Sum)

    def allreduce_async(self, x: tf.Tensor, *, name: str, average: bool = True) -> tf.Tensor:
        return self.allreduce(x, name=name, average=average)

    def allgather(self, x: tf.Tensor, *, name: str) -> tf.Tensor:
        out = hvd.allgather(x, name=name)
        self._count(out, (self.size - 1) / self.size)
        return out

    def reducescatter(self, x: tf.Tensor, *, name: str, average: bool = True) -> tf.Tensor:
        self._count(x, (self.size - 1) / self.size)
        out = hvd.reducescatter(x, name=name, op=hvd.Average if average else hvd.Sum)
        return tf.reshape(out, x.shape[1:])

    def broadcast(self, x: tf.Tensor, root: int, *, name: str, group: Optional[Sequence[int]] = None) -> tf.Tensor:
        members = len(group) if group is not None else self.size
        self._count(x, (members - 1) / members)
        return hvd.broadcast(x, root, name=name, process_set=self._process_set(group))

    def broadcast_async(self, x: tf.Tensor, root: int, *, name: str, group: Optional[Sequence[int]] = None) -> tf.Tensor:
        return self.broadcast(x, root, name=name, group=group)

    def wait(self, handle: tf.Tensor) -> tf.Tensor:
        return handle

    def allgather_object(self, obj: Any, *, name: str) -> List[Any]:
        return hvd.allgather_object(obj, name=name)
