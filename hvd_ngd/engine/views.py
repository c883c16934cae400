"""String-keyed views of per-statistic state, for inspection (``engine.factors["fc1/A"]``)."""

from __future__ import annotations

import collections.abc
from typing import Any, Dict, Iterator

from hvd_ngd.keys import StatKey
from hvd_ngd.ops.base import Array


class FactorView(collections.abc.MutableMapping):
    """Per-statistic values keyed by their string names (``"layer/A"``), for inspection."""

    def __init__(self, factors: Dict[StatKey, Any]) -> None:
        self._factors = factors

    def __getitem__(self, name: str) -> Array:
        return self._factors[StatKey.parse(name)]

    def __setitem__(self, name: str, value: Array) -> None:
        self._factors[StatKey.parse(name)] = value

    def __delitem__(self, name: str) -> None:
        del self._factors[StatKey.parse(name)]

    def __iter__(self) -> Iterator[str]:
        return (str(k) for k in self._factors)

    def __len__(self) -> int:
        return len(self._factors)
