"""Distribution strategies of the preconditioner engine, behind one protocol
(``base.DistributionStrategy``): SP-NGD (``spngd``) and KAISA's COMM-OPT / MEM-OPT / HYBRID
(``kaisa``)."""

from __future__ import annotations

from hvd_ngd.enums import Strategy
from hvd_ngd.strategies.base import DistributionStrategy, EngineContext


def make_strategy(strategy: Strategy, ctx: EngineContext) -> DistributionStrategy:
    """The strategy object for ``strategy``."""
    from hvd_ngd.strategies.kaisa import KAISAStrategy
    from hvd_ngd.strategies.spngd import SPNGDStrategy

    if strategy is Strategy.SPNGD:
        return SPNGDStrategy(ctx)
    return KAISAStrategy(ctx)
