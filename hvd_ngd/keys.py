"""Typed keys of curvature statistics.

A statistic is one running estimate kept for one layer: the Kronecker factors ``A`` and ``G``
of a K-FAC layer, or the unit-wise Fisher blocks ``F`` of a BatchNorm/LayerNorm layer. The core
keys its factors, inverses and schedules by ``StatKey``; the string form ``"layer/A"`` exists
only at the edges (checkpoints, messages, collective names).
"""

from __future__ import annotations

import dataclasses
import enum


class Statistic(str, enum.Enum):
    """Which statistic of a layer."""

    A = "A"  # activations' second moment (Kronecker input factor)
    G = "G"  # output gradients' second moment (Kronecker output factor)
    F = "F"  # unit-wise 2x2 Fisher blocks, one per channel (SP-NGD)


@dataclasses.dataclass(frozen=True, order=True)
class StatKey:
    """One statistic of one layer.

    Attributes:
        layer: the layer's registered name.
        statistic: which of its statistics.
        block: the diagonal block of a split factor (``hvd_ngd.blocks.layout``), or -1 for the
            whole statistic.
    """

    layer: str
    statistic: Statistic
    block: int = -1

    def __str__(self) -> str:
        base = f"{self.layer}/{self.statistic.value}"
        return base if self.block < 0 else f"{base}#{self.block}"

    @classmethod
    def parse(cls, text: str) -> "StatKey":
        """Inverse of ``str(key)`` (checkpoints store statistics by their string form).

        Raises:
            ValueError: ``text`` is not ``"<layer>/<A|G|F>"`` or ``"<layer>/<A|G>#<block>"``.
        """
        layer, sep, kind = text.rpartition("/")
        kind, hash_, block = kind.partition("#")
        if not sep or not layer or kind not in Statistic._value2member_map_ or (hash_ and not block.isdigit()):
            raise ValueError(f"not a statistic name: {text!r} (expected '<layer>/A', '/G', '/F' or '/A#<block>')")
        return cls(layer, Statistic(kind), int(block) if hash_ else -1)
