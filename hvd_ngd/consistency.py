"""Rank-consistency checks: every rank must register the same layers with the same config."""

from __future__ import annotations

from typing import Any, List, Sequence

from hvd_ngd.communicator import Communicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.layer_spec import LayerSpec


class RankMismatchError(ValueError):
    """Ranks registered different layers or configurations."""


def _describe_layers(specs: Sequence[LayerSpec]) -> List[tuple]:
    return [(s.name, s.kind.value, s.in_features, s.out_features, s.has_bias) for s in specs]


def check_consistent(comm: Communicator, specs: Sequence[LayerSpec], config: KFACConfig) -> None:
    """Compare this rank's layers and config with every other rank's using one collective.

    Raises:
        RankMismatchError: on every rank, naming the first differing layers or config values.
    """
    mine: Any = {"layers": _describe_layers(specs), "config": config.describe()}
    everyone = comm.allgather_object(mine, name="hvd_ngd.consistency")
    reference = everyone[0]
    problems: List[str] = []
    for rank, other in enumerate(everyone[1:], start=1):
        if other["layers"] != reference["layers"]:
            a, b = reference["layers"], other["layers"]
            diffs = [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y][:3]
            detail = "; ".join(f"position {i}: rank 0 has {x}, rank {rank} has {y}" for i, x, y in diffs)
            if len(a) != len(b):
                only0 = sorted({x[0] for x in a} - {y[0] for y in b})
                only_r = sorted({y[0] for y in b} - {x[0] for x in a})
                detail += f"; rank 0 registered {len(a)} layers, rank {rank} {len(b)} (only on rank 0: {only0}, only on rank {rank}: {only_r})"
            problems.append(f"layers differ between rank 0 and rank {rank}: {detail}")
        diff_cfg = {
            k: (reference["config"][k], other["config"].get(k))
            for k in reference["config"]
            if reference["config"][k] != other["config"].get(k)
        }
        if diff_cfg:
            problems.append(
                f"config differs between rank 0 and rank {rank}: "
                + ", ".join(f"{k}: {v0!r} vs {v1!r}" for k, (v0, v1) in diff_cfg.items())
            )
    if problems:
        raise RankMismatchError("hvd_ngd: ranks disagree (every rank must build the same model and config): " + " | ".join(problems))
