"""The interface every curvature block implements."""

from __future__ import annotations

import abc
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from hvd_ngd.inverse import FactorInverse
from hvd_ngd.keys import StatKey
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops.base import Array, ArrayOps


class CurvatureBlock(abc.ABC):
    """The curvature model of one layer.

    Attributes:
        spec: the layer.
        statistics: the keys of the running statistics it keeps, in a fixed order.
    """

    spec: LayerSpec
    statistics: Tuple[StatKey, ...]
    split: bool = False  # statistics kept as diagonal blocks of a split factor

    @property
    def name(self) -> str:
        """The layer's name."""
        return self.spec.name

    @abc.abstractmethod
    def is_symmetric_matrix(self, key: StatKey) -> bool:
        """Whether the statistic is a symmetric matrix (sent as its upper triangle)."""

    @abc.abstractmethod
    def shape(self, key: StatKey) -> Tuple[int, ...]:
        """Shape of a statistic."""

    @property
    @abc.abstractmethod
    def inverted(self) -> Tuple[StatKey, ...]:
        """Statistics that are decomposed or inverted (none for closed-form blocks)."""

    def invert(self, ops: ArrayOps, key: StatKey, factors: Mapping[StatKey, Array], damping: float) -> FactorInverse:
        """Decompose or invert one statistic (only for keys in ``inverted``)."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse for {key}")

    def inverse_template(self, ops: ArrayOps, key: StatKey, like: Array) -> List[Array]:
        """Zero tensors shaped like the wire form of an inverse (for receiving a broadcast)."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse for {key}")

    def rebuild_inverse(self, ops: ArrayOps, key: StatKey, tensors: List[Array]) -> FactorInverse:
        """A ``FactorInverse`` from its wire tensors (``inverse_to_tensors`` order)."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse for {key}")

    @abc.abstractmethod
    def has_curvature(self, factors: Mapping[StatKey, Array], inverses: Mapping[StatKey, FactorInverse]) -> bool:
        """Whether ``precondition`` has what it needs."""

    @abc.abstractmethod
    def precondition(
        self,
        ops: ArrayOps,
        grad: Array,
        factors: Mapping[StatKey, Array],
        inverses: Dict[StatKey, FactorInverse],
        damping: float,
    ) -> Array:
        """The natural gradient of the layer's gradient matrix, in the gradient's dtype."""

    # ------------------------------------------------------------------ frozen curvature
    def operand_shapes(self) -> Optional[List[Tuple[int, ...]]]:
        """Shapes of ``operands`` (None: this block cannot precondition from operands, so a
        compiled frozen step is not available for it)."""
        return None

    def operands(
        self, ops: ArrayOps, factors: Mapping[StatKey, Array], inverses: Mapping[StatKey, FactorInverse], damping: float
    ) -> Tuple["Array | float", ...]:
        """Everything ``apply`` needs, fixed until a factor, a decomposition or the damping
        changes (the curvature a compiled step holds between refreshes)."""
        raise NotImplementedError(f"{type(self).__name__} has no frozen operands")

    def apply(self, ops: ArrayOps, grad: Array, operands: Sequence["Array | float"]) -> Array:
        """The natural gradient of a gradient matrix from ``operands`` (pure: no state read)."""
        raise NotImplementedError(f"{type(self).__name__} has no frozen operands")
