"""``hvd_ngd.communicator.Communicator`` implemented with ``horovod.torch`` collectives."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import horovod.torch as hvd
import torch

from hvd_ngd.horovod.communicator import HorovodCommunicatorBase


class HorovodCommunicator(HorovodCommunicatorBase):
    """Horovod collectives on torch tensors; groups map to ``hvd.ProcessSet``s (see
    ``HorovodCommunicatorBase`` for process sets and byte accounting). Tensors are made
    contiguous before they are handed to Horovod."""

    def __init__(self) -> None:
        super().__init__(hvd, "hvd_ngd.torch")

    def _count(self, x: torch.Tensor, factor: float) -> None:
        self.count(x.numel(), x.element_size(), factor)

    def allreduce(self, x: torch.Tensor, *, name: str, average: bool = True) -> torch.Tensor:
        self._count(x, self.ring_allreduce_factor())
        return hvd.allreduce(x.contiguous(), name=name, op=hvd.Average if average else hvd.Sum)

    def allreduce_async(self, x: torch.Tensor, *, name: str, average: bool = True) -> Any:
        self._count(x, self.ring_allreduce_factor())
        return hvd.allreduce_async(x.contiguous(), name=name, op=hvd.Average if average else hvd.Sum)

    def allgather(self, x: torch.Tensor, *, name: str) -> torch.Tensor:
        out = hvd.allgather(x.contiguous(), name=name)
        self._count(out, self.ring_share())  # ring: every rank forwards n-1 blocks
        return out

    def reducescatter(self, x: torch.Tensor, *, name: str, average: bool = True) -> torch.Tensor:
        self._count(x, self.ring_share())
        out = hvd.reducescatter(x.contiguous(), name=name, op=hvd.Average if average else hvd.Sum)
        return out.reshape(x.shape[1:])

    def broadcast(self, x: torch.Tensor, root: int, *, name: str, group: Optional[Sequence[int]] = None) -> torch.Tensor:
        return self.wait(self.broadcast_async(x, root, name=name, group=group))

    def broadcast_async(self, x: torch.Tensor, root: int, *, name: str, group: Optional[Sequence[int]] = None) -> Any:
        self._count(x, self.ring_share(len(group) if group is not None else None))  # pipelined ring
        return hvd.broadcast_async(x.contiguous(), root, name=name, process_set=self.process_set(group))

    def wait(self, handle: Any) -> torch.Tensor:
        """Result of an asynchronous collective (a tensor is returned as it is)."""
        return handle if torch.is_tensor(handle) else hvd.synchronize(handle)
