"""A measured cost model of the curvature work: seconds per decomposition, preconditioning, byte.

Fits (all coefficients >= 0, seconds):
    * inverse of a factor of side n (EIGEN: eigh; CHOLESKY: Cholesky inverse):
      ``a n^3 + b n^2 + c``;
    * preconditioning a (rows x cols) gradient with G cut into blocks g_j and A into blocks a_i:
      ``p_mm * (cols * sum g_j^2 + rows * sum a_i^2) + p_el * rows * cols + p_call * matmuls
      + p_layer`` where ``matmuls`` counts the block matmuls (the A terms vanish for a diagonal
      A) and ``p_layer`` is the fixed cost of one layer (casts, the eigenvalue denominators);
    * unit-wise (BatchNorm/LayerNorm) layers of C units, solving their 2x2 blocks:
      ``u_unit * C + u_layer``; a diagonal factor's inverse of side n likewise ``u_unit * n + u_layer``
      (a few elementwise passes);
    * optionally, a collective of ``nbytes``: ``latency + per_byte * nbytes`` (measured by the
      adapter on its communicator at its world size).

``hvd_ngd.costs.calibrate`` measures the coefficients on the running machine.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

from hvd_ngd.enums import InverseMethod



@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds per piece of curvature work on one device.

    Attributes:
        method: the inverse method the ``inverse`` fit times.
        inverse: (a, b, c) of ``a n^3 + b n^2 + c``.
        precondition: (p_mm, p_el, p_call, p_layer), see the module docstring.
        unitwise: (u_unit, u_layer), see the module docstring.
        collective: (latency, per_byte) of one collective, or None when not measured.
        backend: ``ArrayOps.name`` it was measured with; device and dtype likewise.
    """

    method: InverseMethod
    inverse: Tuple[float, float, float]
    precondition: Tuple[float, float, float, float]
    unitwise: Tuple[float, float] = (0.0, 0.0)
    collective: Optional[Tuple[float, float]] = None
    backend: str = ""
    device: str = ""
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", InverseMethod(self.method))
        for name, values, length in (("inverse", self.inverse, 3), ("precondition", self.precondition, 4),
                                     ("unitwise", self.unitwise, 2)):
            if len(values) != length or any(not v >= 0.0 for v in values):
                raise ValueError(f"CostModel.{name}={values!r}: needs {length} coefficients, each >= 0")
        if self.collective is not None and (len(self.collective) != 2 or any(not v >= 0.0 for v in self.collective)):
            raise ValueError(f"CostModel.collective={self.collective!r}: needs (latency, per_byte), each >= 0")
        object.__setattr__(self, "inverse", tuple(float(v) for v in self.inverse))
        object.__setattr__(self, "precondition", tuple(float(v) for v in self.precondition))
        object.__setattr__(self, "unitwise", tuple(float(v) for v in self.unitwise))
        if self.collective is not None:
            object.__setattr__(self, "collective", tuple(float(v) for v in self.collective))

    # ------------------------------------------------------------------ predictions
    def inverse_seconds(self, n: int, diagonal: bool = False) -> float:
        """Decomposition / inverse of one factor (or block) of side ``n``."""
        if diagonal:
            return self.unitwise_seconds(n)
        a, b, c = self.inverse
        return a * n**3 + b * n**2 + c

    def unitwise_seconds(self, units: int) -> float:
        """Inverting or applying the 2x2 unit-wise blocks of ``units`` channels."""
        return self.unitwise[0] * units + self.unitwise[1]

    def precondition_seconds(self, g_sizes: Sequence[int], a_sizes: Sequence[int], a_diagonal: bool = False) -> float:
        """Preconditioning one layer's gradient (sum(g_sizes) x sum(a_sizes)) with block factors."""
        rows, cols = sum(g_sizes), sum(a_sizes)
        flops = cols * sum(s * s for s in g_sizes)
        matmuls = len(g_sizes)
        if not a_diagonal:
            flops += rows * sum(s * s for s in a_sizes)
            matmuls += len(a_sizes)
        p_mm, p_el, p_call, p_layer = self.precondition
        return p_mm * flops + p_el * rows * cols + p_call * matmuls + p_layer

    def collective_seconds(self, nbytes: float) -> float:
        """One collective of ``nbytes`` (0.0 when the model has no collective term)."""
        if self.collective is None:
            return 0.0
        latency, per_byte = self.collective
        return latency + per_byte * nbytes

    # ------------------------------------------------------------------ persistence
    def with_collective(self, latency: float, per_byte: float) -> "CostModel":
        """This model with a measured collective term."""
        return dataclasses.replace(self, collective=(latency, per_byte))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form (``from_dict`` reads it back)."""
        out = dataclasses.asdict(self)
        out["method"] = self.method.value
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CostModel":
        """Rebuild from ``to_dict`` output.

        Raises:
            ValueError: missing or invalid fields (names them).
        """
        try:
            collective = data.get("collective")
            return cls(
                method=InverseMethod(data["method"]),
                inverse=tuple(data["inverse"]),
                precondition=tuple(data["precondition"]),
                unitwise=tuple(data.get("unitwise", (0.0, 0.0))),
                collective=None if collective is None else tuple(collective),
                backend=str(data.get("backend", "")),
                device=str(data.get("device", "")),
                dtype=str(data.get("dtype", "float32")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid cost model data (field {exc}): recalibrate it") from exc
