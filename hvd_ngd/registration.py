"""Which of a model's layers are preconditioned: the ``skip_layers`` patterns and the adapters'
``make_layer`` verdicts, applied the same way by both adapters."""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

L = TypeVar("L")
MakeLayer = Callable[[str, Any], Tuple[Optional[Union[L, List[L]]], Optional[str]]]


def register_layers(
    named_layers: Iterable[Tuple[str, Any]],
    make_layer: MakeLayer,
    skip_layers: Sequence[str],
    *,
    adapter: str,
    supported: str,
    model_name: str,
) -> Tuple[List[L], Dict[str, str]]:
    """The registered layers, in model order, and why each other candidate was skipped.

    A layer whose name or class name matches a ``skip_layers`` pattern is skipped silently;
    a supported type in an unsupported configuration is skipped with a warning naming the
    reason; other layer types keep their plain gradients without a word.

    Args:
        named_layers: (unique name, framework layer) pairs.
        make_layer: the adapter's ``make_layer(name, layer) -> (registered or None, reason)``;
            ``registered`` may be a list (one framework layer preconditioned as several blocks,
            e.g. the groups of a grouped convolution), registered in its order.
        skip_layers: regular expressions (``KFACConfig.skip_layers``).
        adapter: e.g. ``"hvd_ngd.torch"``, for the error message.
        supported: the supported layer types, for the error message.
        model_name: the model's name, for the error message.

    Raises:
        ValueError: no supported layer was found.
    """
    patterns = [re.compile(p) for p in skip_layers]
    layers: List[L] = []
    skipped: Dict[str, str] = {}
    for name, layer in named_layers:
        if any(p.search(name) or p.search(type(layer).__name__) for p in patterns):
            skipped[name] = "matched skip_layers"
            continue
        registered, reason = make_layer(name, layer)
        if registered is None:
            if reason is not None:
                skipped[name] = reason
                warnings.warn(f"hvd_ngd: not preconditioning {name!r} ({type(layer).__name__}): {reason}", stacklevel=3)
            continue
        if isinstance(registered, list):
            layers.extend(registered)
        else:
            layers.append(registered)
    if not layers:
        raise ValueError(f"{adapter}.KFAC found no supported layer ({supported}) in {model_name}; skipped: {skipped}")
    return layers, skipped
