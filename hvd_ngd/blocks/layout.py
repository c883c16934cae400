"""How a factor of side n is cut into k diagonal blocks (a block-diagonal approximation).

The blocks are contiguous and as equal as possible: the first ``n % k`` blocks are one larger.
Block ``i`` covers rows and columns ``offsets[i] : offsets[i] + sizes[i]`` of the factor; k = 1
is the whole factor (exact, today's K-FAC).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Tuple


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Sizes and offsets of the diagonal blocks of one factor.

    Attributes:
        n: side of the factor.
        sizes: side of each block, summing to ``n``.
    """

    n: int
    sizes: Tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.sizes or any(s < 1 for s in self.sizes) or sum(self.sizes) != self.n:
            raise ValueError(f"invalid BlockLayout: block sizes {self.sizes} must be >= 1 and sum to n={self.n}")

    @property
    def k(self) -> int:
        """Number of blocks."""
        return len(self.sizes)

    @property
    def offsets(self) -> Tuple[int, ...]:
        """First row/column of each block."""
        out, start = [], 0
        for s in self.sizes:
            out.append(start)
            start += s
        return tuple(out)

    def slices(self) -> Iterator[slice]:
        """``slice(offset, offset + size)`` of each block, in order."""
        for start, size in zip(self.offsets, self.sizes):
            yield slice(start, start + size)

    @property
    def kept_elements(self) -> int:
        """Entries of the factor the blocks keep: sum of size^2 (n^2 when k = 1)."""
        return sum(s * s for s in self.sizes)


def block_layout(n: int, k: int) -> BlockLayout:
    """Cut a side-``n`` factor into ``k`` contiguous blocks, the first ``n % k`` one larger.

    Raises:
        ValueError: ``n < 1`` or ``k`` not in [1, n], naming the factor side and the fix.
    """
    for name, value in (("n", n), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"block_layout: {name}={value!r} must be an int")
    if n < 1:
        raise ValueError(f"block_layout: factor side n={n} must be >= 1")
    if not 1 <= k <= n:
        raise ValueError(f"block_layout: k={k} blocks for a factor of side {n}: choose 1 <= k <= {n}")
    base, extra = divmod(n, k)
    return BlockLayout(n, tuple(base + 1 if i < extra else base for i in range(k)))
