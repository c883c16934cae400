"""Elastic Horovod (``hvd.elastic.run``) for ``hvd_ngd.torch``: preconditioner state that is
committed, restored and carried over a change of the world size.

Usage, with the drop-in optimizer (its ``kfac`` is found) or with ``kfac=`` for the
canonical ``hvd.DistributedOptimizer`` + ``KFAC`` pattern::

    import horovod.torch as hvd
    import hvd_ngd.torch as ngd
    from hvd_ngd.torch.elastic import KFACState

    hvd.init()
    optimizer = ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    state = KFACState(model=model, optimizer=optimizer, epoch=0, batch=0)

    @hvd.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            ...
            optimizer.step()
            state.batch += 1
            state.commit()

    train(state)

What happens to the preconditioner:

- ``commit()`` saves ``kfac.state_dict()``: every running factor, inverse, pending stale inverse,
  the stale-statistics intervals, the step count and the per-layer damping, gathered from the
  ranks that own them (a collective; every rank commits at the same point). Every rank keeps the
  whole committed state, so factors owned by a rank that leaves are not lost.
- After Horovod resets (workers added or removed, or a failed collective) the engine is rebuilt
  for the new ``hvd.size()`` and rank: a new layer-to-rank plan and new worker groups, and the
  committed state is loaded into it. This happens in ``reset()`` (local: Horovod skips ``sync()``
  when workers were only removed) and again in ``sync()``, where rank 0's committed state is
  broadcast so that new workers get it. The rank-consistency check and the registration of the
  new world's process sets (collectives) run in ``sync()``, or at the next ``step()`` when no
  sync follows.
- ``restore()`` (after a failed collective) reloads the last committed state. The optimizer's
  committed state is reloaded as a copy (Horovod's own handler loads the saved tensors
  themselves, which the next steps then change in place), so it survives repeated failures.

Under ``horovodrun`` elastic (``HOROVOD_ELASTIC=1``) constructing a ``KFAC`` communicates
nothing (a joining worker builds its model while the others synchronise); the consistency check
and process-set registration run at the first sync. Costs and limits: a commit gathers every
rank's statistics to every rank (one ``allgather_object``) and keeps the whole state in host
memory on every rank, so commit every few steps rather than every step for large models;
``strategy='hybrid'`` needs a ``grad_worker_fraction`` that fits every world size the job can
reach (otherwise the reset raises ``ValueError``).

A plain ``hvd.elastic.TorchState(kfac=kfac)`` raises ``TypeError`` once this module is imported
(it would pickle the preconditioner as an ordinary object and never re-plan it).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import horovod.torch as hvd
import torch
from horovod.torch.elastic.state import (
    OptimizerStateHandler,
    StateHandler,
    TorchState,
    get_handler_registry,
    set_handler_registry,
)

from hvd_ngd.torch.preconditioner import KFAC

_STATE_NAME = "hvd_ngd.elastic.kfac_state"


class KFACStateHandler(StateHandler):
    """Saves, restores and synchronises one ``KFAC`` for ``horovod.torch.elastic.TorchState``.

    Args:
        kfac: the preconditioner (``optimizer.kfac`` of ``hvd_ngd.torch.DistributedOptimizer``).

    Attributes:
        committed: the last committed state (``{"kfac": kfac.state_dict()}``, which carries the
            scheduled hyperparameters too, so a joining worker agrees with the others),
            the same on every rank; None before the first commit or sync.
    """

    def __init__(self, kfac: KFAC) -> None:
        if not isinstance(kfac, KFAC):
            raise TypeError(f"KFACStateHandler needs a hvd_ngd.torch.KFAC, got {type(kfac).__name__}")
        super().__init__(kfac)
        # Nothing is saved here: saving is a collective, and a worker that joins a running job
        # builds its state while the others synchronise.
        self.committed: Optional[Dict[str, Any]] = None

    @property
    def kfac(self) -> KFAC:
        """The handled preconditioner."""
        return self.value

    def set_value(self, value: KFAC) -> None:
        """Handle another preconditioner (``state.kfac = ...``); saves it, as Horovod's handlers do."""
        if not isinstance(value, KFAC):
            raise TypeError(f"state.kfac must be a hvd_ngd.torch.KFAC, got {type(value).__name__}")
        super().set_value(value)

    def _snapshot(self) -> Dict[str, Any]:
        """The preconditioner's complete state, scheduled hyperparameters included (a collective)."""
        return {"kfac": self.kfac.state_dict()}

    def _load(self, state: Dict[str, Any], rebuild: bool) -> None:
        """Load ``state`` (local), on a new engine for the current world when ``rebuild``."""
        if rebuild:
            self.kfac.rebuild()
        else:
            self.kfac.abandon_step()  # e.g. a step interrupted between backward and step()
        self.kfac.load_state_dict(state["kfac"])

    def save(self) -> None:
        """Gather and keep the complete preconditioner state (a collective of every rank)."""
        self.committed = self._snapshot()

    def restore(self) -> None:
        """Return to the last committed state (local; Horovod is not queried, since it may be
        down after a failed collective). Without a commit the preconditioner starts over with
        empty statistics at step 0."""
        if self.committed is not None:
            self._load(self.committed, rebuild=False)
            return
        self.kfac.abandon_step()
        try:
            self.kfac.rebuild()
        except ValueError:  # Horovod is not initialised now: reset() rebuilds after hvd.init()
            pass

    def reset(self) -> None:
        """After Horovod re-initialised: re-plan for the new world and load the committed state.

        Local (no collective): Horovod runs it before ``sync()``, and skips ``sync()`` when
        workers were only removed. Process sets and the consistency check follow at ``sync()``
        or at the next ``step()``. Without a commit the preconditioner starts over.
        """
        if self.committed is None:
            self.kfac.rebuild()
        else:
            self._load(self.committed, rebuild=True)

    def sync(self) -> None:
        """Give every rank rank 0's committed state, on an engine planned for this world.

        A collective: rank 0's committed state is broadcast (rank 0's current state, gathered,
        when it has committed nothing yet), the layers and config are compared across ranks and
        the process sets of the new plan are registered.

        Raises:
            RankMismatchError: ranks registered different layers or configurations.
        """
        comm = self.kfac.comm
        committed = _broadcast(comm, self.committed)
        if committed is not None:
            # before the consistency check, which compares them
            self.kfac.engine.load_hyperparameters(committed["kfac"]["engine"]["hyperparameters"])
        if not self.kfac.is_current():
            self.kfac.rebuild()
        self.kfac.connect()
        if committed is None:
            committed = _broadcast(comm, self._snapshot())
        self._load(committed, rebuild=False)
        self.committed = committed


def _broadcast(comm: Any, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank, through the communicator (Horovod's ``broadcast_object``;
    an injected communicator without it uses ``allgather_object``)."""
    broadcast_object = getattr(comm, "broadcast_object", None)
    if broadcast_object is not None:
        return broadcast_object(obj, 0, name=_STATE_NAME)
    return comm.allgather_object(obj, name=_STATE_NAME)[0]


class _CopyingOptimizerStateHandler(OptimizerStateHandler):
    """Horovod's optimizer handler, but ``restore()`` loads a copy of the committed state.

    ``torch.optim.Optimizer.load_state_dict`` keeps the tensors it is given (momentum buffers,
    Adam moments) as the optimizer's state, so after Horovod's ``restore()`` the following steps
    change the committed state in place, and a second failure before the next commit would
    restore those changed values instead of the commit.
    """

    def restore(self) -> None:
        self.value.load_state_dict(copy.deepcopy(self._saved_optimizer_state))


class KFACState(TorchState):
    """``hvd.elastic.TorchState`` that also commits, restores and re-plans a ``KFAC``.

    Args:
        model: the model (as for ``TorchState``).
        optimizer: the optimizer; an ``hvd_ngd.torch.DistributedOptimizer`` brings its ``kfac``.
        kfac: the preconditioner, when it is not ``optimizer.kfac`` (the ``hvd.DistributedOptimizer``
            + ``KFAC`` pattern).
        **kwargs: further state (``epoch=0, batch=0``, samplers, ...), as for ``TorchState``.

    Attributes:
        kfac: the preconditioner (assigning another one saves it, as for ``model``).

    Raises:
        ValueError: no preconditioner was given and ``optimizer`` has none.
    """

    def __init__(
        self,
        model: Optional[torch.nn.Module] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        kfac: Optional[KFAC] = None,
        **kwargs: Any,
    ) -> None:
        if kfac is None:
            kfac = getattr(optimizer, "kfac", None)
        if kfac is None:
            raise ValueError(
                "KFACState needs the preconditioner: pass kfac=..., or an optimizer from "
                "hvd_ngd.torch.DistributedOptimizer (which has a .kfac)"
            )
        super().__init__(model=model, optimizer=optimizer, **kwargs)
        for name, handler in list(self._handlers.items()):
            if type(handler) is OptimizerStateHandler:
                self._handlers[name] = _CopyingOptimizerStateHandler(handler.value)
        # After the model and optimizer: their sync runs first, as in Horovod's own ordering.
        self._handlers["kfac"] = KFACStateHandler(kfac)
        self.kfac = kfac

    @property
    def kfac_handler(self) -> KFACStateHandler:
        """The preconditioner's handler (its ``committed`` state)."""
        return self._handlers["kfac"]

    def reset(self) -> None:
        """After Horovod re-initialised (workers added or removed, or a failed collective):
        rebuild the preconditioner's engine for the new world and load the committed state."""
        self.kfac_handler.reset()
        super().reset()


class _PlainTorchStateGuard(StateHandler):
    """Registered for ``KFAC`` in ``horovod.torch.elastic``: a plain ``TorchState`` would pickle
    the preconditioner as an ordinary object and never re-plan it, so it is refused."""

    def __init__(self, value: KFAC) -> None:
        raise TypeError(
            "hvd.elastic.TorchState cannot carry a hvd_ngd KFAC over a world-size change: use "
            "hvd_ngd.torch.elastic.KFACState(model=..., optimizer=..., kfac=..., **kwargs) instead"
        )


def _register() -> None:
    """Make ``hvd.elastic.TorchState(kfac=...)`` fail clearly (idempotent)."""
    registry = list(get_handler_registry())
    if not any(cls is _PlainTorchStateGuard for _, cls in registry):
        set_handler_registry([(KFAC, _PlainTorchStateGuard)] + registry)


_register()

__all__ = ["KFACState", "KFACStateHandler"]
