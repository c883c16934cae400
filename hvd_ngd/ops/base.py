"""The array-operations interface the framework-neutral core is written against.

The core never imports a framework. Each adapter (``hvd_ngd.torch``, ``hvd_ngd.tensorflow``)
implements this protocol on its own tensors so the math stays on the framework's device; the
numpy implementation in ``hvd_ngd.ops.numpy_ops`` is the reference used by the tests.
"""

from __future__ import annotations

from typing import Any, List, Protocol, Sequence, Tuple, runtime_checkable

Array = Any  # a framework tensor or numpy array


@runtime_checkable
class ArrayOps(Protocol):
    """Minimal set of array operations used by the core math."""

    name: str

    # --- construction / conversion -------------------------------------------------------
    def to_numpy(self, x: Array) -> Any:
        """Return a numpy copy of ``x``."""

    def from_numpy(self, x: Any, like: Array | None = None) -> Array:
        """Convert a numpy array to this backend, keeping its dtype, on ``like``'s device if given."""

    def zeros(self, shape: Sequence[int], like: Array) -> Array:
        """Zeros of ``shape`` with ``like``'s dtype and device."""

    def ones(self, shape: Sequence[int], like: Array) -> Array:
        """Ones of ``shape`` with ``like``'s dtype and device."""

    def eye(self, n: int, like: Array) -> Array:
        """Identity of size ``n`` with ``like``'s dtype and device."""

    def dtype_name(self, x: Array) -> str:
        """Element type as a numpy-style name: 'float16', 'bfloat16', 'float32', 'float64'."""

    def cast(self, x: Array, dtype_name: str) -> Array:
        """Cast ``x`` to the numpy-style element type ``dtype_name``."""

    def shape(self, x: Array) -> Tuple[int, ...]:
        """Static shape of ``x`` as a tuple of ints."""

    # --- shape manipulation --------------------------------------------------------------
    def reshape(self, x: Array, shape: Sequence[int]) -> Array:
        """Reshape (may copy)."""

    def transpose(self, x: Array) -> Array:
        """Matrix transpose of a 2-D array (swap the last two axes for batched arrays)."""

    def concat(self, xs: Sequence[Array], axis: int) -> Array:
        """Concatenate along ``axis``."""

    def stack(self, xs: Sequence[Array], axis: int) -> Array:
        """Stack along a new ``axis``."""

    def flatten(self, x: Array) -> Array:
        """1-D view/copy of ``x``."""

    def triu_indices(self, n: int, like: Array) -> Tuple[Array, Array]:
        """Row and column indices of the upper triangle (diagonal included) of an n x n matrix."""

    def gather2d(self, x: Array, rows: Array, cols: Array) -> Array:
        """``x[rows, cols]`` for index arrays."""

    def index(self, values: Any, like: Array) -> Array:
        """An integer index tensor from a numpy int64 array, on ``like``'s device (built once
        and kept: packing plans create their indices at the first step only)."""

    def take(self, x: Array, indices: Array) -> Array:
        """``x[indices]`` of a 1-D ``x`` (one gather)."""

    def scatter_sym(self, values: Array, rows: Array, cols: Array, n: int) -> Array:
        """Symmetric n x n matrix with ``values`` at (rows, cols) and (cols, rows)."""

    # --- elementwise / reductions ---------------------------------------------------------
    def matmul(self, a: Array, b: Array) -> Array:
        """Matrix product (batched over leading axes)."""

    def sum(self, x: Array, axis: int | None = None) -> Array:
        """Sum over ``axis`` (all axes when None)."""

    def amax(self, x: Array, axis: Any = None, keepdims: bool = False) -> Array:
        """Largest element over ``axis`` (an int, a tuple of ints, or None for all)."""

    def unstack(self, x: Array) -> List[Array]:
        """The slices ``x[0], x[1], ...`` along the first axis (views where the backend has them)."""

    def total_sum(self, xs: Sequence[Array]) -> Array:
        """Sum of every element of every array, as a 0-d float32 tensor (float64 when any array
        is float64), computed on the device in as few launches as the backend allows; inf or NaN
        when any element is (the L1 norm may stand in for the sum where that fuses better)."""

    def flush_tiny(self, x: Array, threshold: float) -> Array:
        """``x`` with the elements of magnitude below ``threshold`` set to 0 (keeps subnormal
        numbers, which slow CPU arithmetic down, out of matmuls)."""

    def safe_reciprocal(self, x: Array) -> Array:
        """1 / x elementwise, 0 where x == 0."""

    def diag(self, x: Array) -> Array:
        """Diagonal of a matrix as a vector, or a diagonal matrix from a vector."""

    def trace(self, x: Array) -> Array:
        """Trace of a square matrix (0-d array)."""

    def sqrt(self, x: Array) -> Array:
        """Elementwise square root."""

    def abs(self, x: Array) -> Array:
        """Elementwise absolute value."""

    def maximum(self, x: Array, y: Array | float) -> Array:
        """Elementwise maximum."""

    def frobenius_norm(self, x: Array) -> Array:
        """Frobenius norm (0-d array)."""

    def all_finite(self, x: Array) -> bool:
        """True when every element is finite (a host synchronisation)."""

    def to_float(self, x: Array) -> float:
        """Python float of a 0-d array (a host synchronisation)."""

    def bincount(self, indices: Array, length: int, like: Array) -> Array:
        """Counts of each integer in ``indices`` (flattened), as ``like``'s dtype, of ``length``."""

    # --- linear algebra -------------------------------------------------------------------
    def eigh(self, x: Array) -> Tuple[Array, Array]:
        """Eigenvalues (ascending) and eigenvectors of a symmetric matrix."""

    def cholesky_inverse(self, x: Array) -> Array:
        """Inverse of a symmetric positive definite matrix via its Cholesky factor.

        Raises:
            LinAlgError-like exception of the backend when ``x`` is not positive definite.
        """
