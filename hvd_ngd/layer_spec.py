"""Description of one preconditioned layer, independent of any framework."""

from __future__ import annotations

import dataclasses
from typing import Tuple

from hvd_ngd.enums import LayerKind


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Shape information of a layer that the core needs for math, placement and wire sizes.

    Attributes:
        name: unique, stable name (identical on every rank).
        kind: the layer kind.
        in_features: input dimension of the Kronecker A factor *without* the bias column
            (Linear: in_features; Conv2d: in_channels*kh*kw; Embedding: num_embeddings;
            unit-wise layers: number of channels/units).
        out_features: dimension of the G factor (Linear/Conv2d: out features/channels;
            Embedding: embedding dim; unit-wise: number of channels/units).
        has_bias: whether a bias is folded into A as an appended ones column.
    """

    name: str
    kind: LayerKind
    in_features: int
    out_features: int
    has_bias: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("LayerSpec.name must be a non-empty string")
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(
                f"LayerSpec {self.name!r}: in_features={self.in_features} and "
                f"out_features={self.out_features} must be >= 1"
            )
        if self.kind.is_unitwise and self.in_features != self.out_features:
            raise ValueError(
                f"LayerSpec {self.name!r}: unit-wise layers need in_features == out_features "
                f"(the number of units), got {self.in_features} and {self.out_features}"
            )

    @property
    def a_dim(self) -> int:
        """Side of the A factor (bias column included)."""
        return self.in_features + (1 if self.has_bias and self.kind is not LayerKind.EMBEDDING else 0)

    @property
    def g_dim(self) -> int:
        """Side of the G factor."""
        return self.out_features

    @property
    def a_is_diagonal(self) -> bool:
        """Embedding layers keep A as a vector (token frequencies)."""
        return self.kind is LayerKind.EMBEDDING

    @property
    def grad_shape(self) -> Tuple[int, int]:
        """Shape of the layer's gradient matrix: (g_dim, a_dim), or (2, C) = [grad_gamma; grad_beta]."""
        return (2, self.out_features) if self.kind.is_unitwise else (self.g_dim, self.a_dim)

    def factor_shapes(self) -> Tuple[Tuple[int, ...], ...]:
        """Shapes of the statistics this layer keeps: (A, G) or the (C, 3) unit-wise blocks."""
        if self.kind.is_unitwise:
            return ((self.out_features, 3),)
        a_shape = (self.a_dim,) if self.a_is_diagonal else (self.a_dim, self.a_dim)
        return (a_shape, (self.g_dim, self.g_dim))
