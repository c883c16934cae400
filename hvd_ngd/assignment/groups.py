"""KAISA gradient-worker groups: ranks are cut into contiguous worker groups of ``grad_workers``
ranks and strided receiver groups; each receiver group meets each worker group in one rank."""

from __future__ import annotations

from typing import List


def _check_groups(world_size: int, grad_workers: int) -> None:
    for name, value in (("world_size", world_size), ("grad_workers", grad_workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"invalid grad_worker_fraction: {name}={value!r} must be an int >= 1")
    if grad_workers < 1 or grad_workers > world_size or world_size % grad_workers != 0:
        raise ValueError(
            f"invalid grad_worker_fraction: {grad_workers} gradient workers do not divide the world size "
            f"{world_size}; grad_worker_fraction * world_size must be a divisor of the world size"
        )


def grad_worker_groups(world_size: int, grad_workers: int) -> List[List[int]]:
    """Contiguous groups of ``grad_workers`` ranks ([[0, 1], [2, 3]] for 4 ranks, 2 workers).

    ``grad_workers = world_size`` is COMM-OPT (one group), 1 is MEM-OPT.

    Raises:
        ValueError: ``grad_workers`` does not divide ``world_size`` (names grad_worker_fraction).
    """
    _check_groups(world_size, grad_workers)
    return [list(range(start, start + grad_workers)) for start in range(0, world_size, grad_workers)]


def grad_receiver_groups(world_size: int, grad_workers: int) -> List[List[int]]:
    """Strided groups {i, i + grad_workers, ...} ([[0, 2], [1, 3]] for 4 ranks, 2 workers).

    Each receiver group meets each worker group in exactly one rank.

    Raises:
        ValueError: ``grad_workers`` does not divide ``world_size`` (names grad_worker_fraction).
    """
    _check_groups(world_size, grad_workers)
    return [list(range(i, world_size, grad_workers)) for i in range(grad_workers)]
