"""Per-Keras-layer capture (Keras 3): canonical layouts, gradient matrices and ``LayerSpec``s.

Each supported layer's ``call`` is wrapped so that every training forward pass records its input
and its *pre-activation* output z: Dense and Conv2D run their original ``call`` with the
activation temporarily set to linear, pass z through an identity whose custom gradient stores
the incoming gradient dL/dz in the record, and then apply the activation themselves. Whoever
asks the tape for the variables' gradients (``model.fit``'s ``train_step``, or
``KFAC.gradient``) thereby also fills in the output gradients the G factor needs, in the same
traced graph, without differentiating twice. Only reshapes live here; the curvature math is the
core's (``hvd_ngd.capture``).

Keras layouts mapped onto the core's canonical ones:
    Dense: kernel (in, out) -> gradient matrix kernel_grad^T (out, in) [+ bias column].
    Conv2D (channels_last, groups=1, dilation 1, 'valid'/'same'): ``tf.image.extract_patches``
        yields patches in (i, j, c) order, the order of ``kernel.reshape(kh*kw*in, out)``, so the
        gradient matrix is ``reshape(kernel_grad, (-1, out))^T`` [+ bias column].
    Embedding: embeddings (V, D) -> gradient matrix dense(grad)^T (D, V).
    BatchNormalization / LayerNormalization over the last axis: unit-wise (2, C) matrix
        [grad_gamma; grad_beta]; x_hat = (y - beta) / gamma (0 where gamma == 0) in (N, C, L).
Other layers with trainable weights (EinsumDense, MultiHeadAttention's projections, Conv1D/3D,
depthwise/separable/transposed convolutions, GroupNormalization, ...) are not preconditioned: they
are reported with the reason and keep their plain (averaged) gradients.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import tensorflow as tf

from hvd_ngd import unitwise
from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.tensorflow.keras_version import require_keras
from hvd_ngd.tensorflow.ops import TFOps

_OPS = TFOps()

keras = require_keras()


class Record:
    """One recorded forward call of a registered layer.

    Attributes:
        inputs: the layer's input.
        output: its pre-activation output z (the tensor the rest of the model consumed).
        grad: dL/dz, set when the tape differentiates through z (None until then, and for
            calls that do not contribute to the differentiated loss).
    """

    __slots__ = ("inputs", "output", "grad")

    def __init__(self, inputs: Any, output: tf.Tensor, grad: Optional[tf.Tensor] = None) -> None:
        self.inputs = inputs
        self.output = output
        self.grad = grad

    @classmethod
    def capture(cls, inputs: Any, z: tf.Tensor) -> "Record":
        """A record whose ``output`` is z behind an identity that stores dL/dz in ``grad``
        whenever a tape differentiates through it (eagerly, or while tracing the backward
        pass into the same graph)."""
        record = cls(inputs, z)

        @tf.custom_gradient
        def identity(t: tf.Tensor) -> Any:
            def grad(dy: tf.Tensor) -> tf.Tensor:
                record.grad = dy
                return dy

            return tf.identity(t), grad

        record.output = identity(z)
        return record


def _tape_active() -> bool:
    """Whether a GradientTape is recording (so an eager forward call may be a training one)."""
    try:
        from tensorflow.python.eager import record

        return bool(record.could_possibly_record())
    except Exception:  # pragma: no cover - private API moved: record everything
        return True


class KerasLayer:
    """A registered Keras layer: spec, forward capture and gradient-matrix conversion.

    Attributes:
        name: unique name (identical on every rank; nested models give ``outer/inner``).
        layer: the Keras layer.
        spec: its framework-neutral description.
        records: the forward calls since the last ``KFAC`` step: eager calls made while a tape
            records, or symbolic calls of traced functions (once per trace; the step keeps
            its own graph's).
    """

    kind: LayerKind

    def __init__(self, name: str, layer: Any, spec: LayerSpec) -> None:
        self.name = name
        self.layer = layer
        self.spec = spec
        self.kind = spec.kind
        self.records: List[Record] = []
        self._original_call: Optional[Any] = None
        self._original_supports_jit = True

    def variables(self) -> List[Any]:
        """Variables preconditioned by this layer (weight first, then bias)."""
        raise NotImplementedError

    def a_input(self, x: tf.Tensor) -> tf.Tensor:
        """Canonical activations for the A factor."""
        raise NotImplementedError

    def g_output(self, g: tf.Tensor) -> tf.Tensor:
        """Canonical output gradients for the G factor (or the unit-wise Fisher)."""
        raise NotImplementedError

    def grad_matrix(self, grads: List[tf.Tensor]) -> tf.Tensor:
        """The core's gradient matrix from the gradients of ``variables()``, in order."""
        raise NotImplementedError

    def split_matrix(self, mat: tf.Tensor) -> List[tf.Tensor]:
        """Inverse of ``grad_matrix``: one tensor per variable, shaped like it."""
        raise NotImplementedError

    @staticmethod
    def batch_size(x: tf.Tensor) -> int:
        """Local batch size of a recorded (eager) input: its first dimension."""
        return int(x.shape[0]) if x.shape.rank else 1

    def wrap(self) -> None:
        """Install the recording ``call`` (idempotent)."""
        if self._original_call is not None:
            return
        original = self.layer.call
        self._original_call = original
        activation = getattr(self.layer, "activation", None)
        linear = keras.activations.get("linear")
        layer, records = self.layer, self.records

        def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if activation is not None:
                layer.activation = linear
            try:
                z = original(inputs, *args, **kwargs)
            finally:
                if activation is not None:
                    layer.activation = activation
            if not tf.executing_eagerly() or _tape_active():  # eager calls outside a tape: inference
                record = Record.capture(inputs, z)
                records.append(record)
                z = record.output
            return activation(z) if activation is not None else z

        self.layer.call = call
        # Keras 3 compiles model.fit's step with XLA by default (jit_compile="auto" asks every
        # layer); Horovod's collectives and the K-FAC step are not XLA ops.
        self._original_supports_jit = getattr(self.layer, "supports_jit", True)
        self.layer.supports_jit = False

    def unwrap(self) -> None:
        """Restore the layer's original ``call``."""
        if self._original_call is not None:
            self.layer.call = self._original_call
            self.layer.supports_jit = self._original_supports_jit
            self._original_call = None
        self.records.clear()


class DenseLayer(KerasLayer):
    """``Dense``: activations (N, in); leading dimensions fold into N."""

    def variables(self) -> List[Any]:
        return [self.layer.kernel] + ([self.layer.bias] if self.layer.use_bias else [])

    def a_input(self, x: tf.Tensor) -> tf.Tensor:
        return tf.reshape(x, (-1, x.shape[-1]))

    def g_output(self, g: tf.Tensor) -> tf.Tensor:
        return tf.reshape(g, (-1, g.shape[-1]))

    def grad_matrix(self, grads: List[tf.Tensor]) -> tf.Tensor:
        mat = tf.transpose(tf.reshape(grads[0], (-1, grads[0].shape[-1])))
        return tf.concat([mat, tf.reshape(grads[1], (-1, 1))], 1) if self.layer.use_bias else mat

    def split_matrix(self, mat: tf.Tensor) -> List[tf.Tensor]:
        kernel = self.layer.kernel
        n_in = int(mat.shape[1]) - (1 if self.layer.use_bias else 0)
        out = [tf.reshape(tf.transpose(mat[:, :n_in]), kernel.shape)]
        return out + ([mat[:, n_in]] if self.layer.use_bias else [])


class Conv2DLayer(DenseLayer):
    """``Conv2D``: im2col patches (N, L, kh*kw*in) in the kernel's (i, j, c) order."""

    def a_input(self, x: tf.Tensor) -> tf.Tensor:
        kh, kw = self.layer.kernel_size
        sh, sw = self.layer.strides
        patches = tf.image.extract_patches(
            x, [1, kh, kw, 1], [1, sh, sw, 1], [1, 1, 1, 1], self.layer.padding.upper()
        )
        return tf.reshape(patches, (tf.shape(patches)[0], -1, patches.shape[-1]))

    def g_output(self, g: tf.Tensor) -> tf.Tensor:
        return tf.reshape(g, (tf.shape(g)[0], -1, g.shape[-1]))


class EmbeddingLayer(KerasLayer):
    """``Embedding``: A is diagonal (token frequencies); gradient matrix is dense(grad)^T."""

    def variables(self) -> List[Any]:
        return [self.layer.embeddings]

    def a_input(self, x: tf.Tensor) -> tf.Tensor:
        return x

    def g_output(self, g: tf.Tensor) -> tf.Tensor:
        return tf.reshape(g, (-1, g.shape[-1]))

    def grad_matrix(self, grads: List[tf.Tensor]) -> tf.Tensor:
        return tf.transpose(tf.convert_to_tensor(grads[0]))

    def split_matrix(self, mat: tf.Tensor) -> List[tf.Tensor]:
        return [tf.transpose(mat)]


class NormLayer(KerasLayer):
    """``BatchNormalization`` / ``LayerNormalization`` over the last axis: unit-wise blocks."""

    def variables(self) -> List[Any]:
        return [self.layer.gamma, self.layer.beta]

    def to_ncl(self, t: tf.Tensor) -> tf.Tensor:
        """(N, C, L) view of an output-shaped tensor (channels last in Keras)."""
        units = self.spec.out_features
        return tf.transpose(tf.reshape(t, (tf.shape(t)[0], -1, units)), (0, 2, 1))

    def x_hat(self, y: tf.Tensor) -> tf.Tensor:
        """Normalized input recovered from the output y, in (N, C, L)."""
        gamma = tf.cast(self.layer.gamma, y.dtype)
        beta = tf.cast(self.layer.beta, y.dtype)
        return unitwise.normalized_input(_OPS, self.to_ncl(y), gamma, beta)

    def g_output(self, g: tf.Tensor) -> tf.Tensor:
        return self.to_ncl(g)

    def grad_matrix(self, grads: List[tf.Tensor]) -> tf.Tensor:
        return tf.stack([tf.reshape(grads[0], (-1,)), tf.reshape(grads[1], (-1,))], 0)

    def split_matrix(self, mat: tf.Tensor) -> List[tf.Tensor]:
        return [tf.reshape(mat[0], self.layer.gamma.shape), tf.reshape(mat[1], self.layer.beta.shape)]


def _normalizes_last_axis(layer: Any) -> bool:
    """Whether a built Keras 3 normalization layer normalizes (BN) / scales (LN) only the last axis."""
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    if len(axes) != 1:
        return False
    spec = getattr(layer, "input_spec", None)  # BatchNormalization sets ndim in build
    ndim = getattr(spec, "ndim", None) if spec is not None and not isinstance(spec, (list, tuple)) else None
    if ndim is None:
        shapes = getattr(layer, "_build_shapes_dict", None) or {}
        shape = next(iter(shapes.values()), None)
        ndim = len(shape) if shape is not None else None
    axis = int(axes[0])
    return axis == -1 or (ndim is not None and axis == ndim - 1)


def _dense_like_problem(layer: Any) -> Optional[str]:
    """Why a Dense / Conv2D / Embedding cannot be preconditioned (LoRA, quantization), or None."""
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled (its low-rank factors, not the kernel, are trained)"
    if getattr(layer, "quantization_mode", None):
        return f"quantized layer (quantization_mode={layer.quantization_mode!r})"
    return None


def make_layer(name: str, layer: Any) -> Tuple[Optional[KerasLayer], Optional[str]]:
    """A ``KerasLayer`` for a supported (built) Keras 3 layer, or (None, reason why not).

    The reason is None for layers without trainable weights of their own (nothing to
    precondition); it is a string for supported types in an unsupported configuration and for
    every other layer type that has trainable weights (they keep their plain gradients).
    """
    L = keras.layers
    kind = type(layer)
    if kind in (L.Conv2D, L.Dense, L.Embedding) and _dense_like_problem(layer):
        return None, _dense_like_problem(layer)
    if kind is L.Conv2D:
        if layer.groups != 1 or tuple(layer.dilation_rate) != (1, 1) or layer.data_format != "channels_last":
            return None, "only groups=1, dilation 1, channels_last Conv2D is supported"
        if layer.padding not in ("valid", "same"):
            return None, f"padding={layer.padding!r} (only 'valid' and 'same')"
        kh, kw = layer.kernel_size
        cin = int(layer.kernel.shape[2])
        spec = LayerSpec(name, LayerKind.CONV2D, kh * kw * cin, layer.filters, layer.use_bias)
        return Conv2DLayer(name, layer, spec), None
    if kind is L.Dense:
        spec = LayerSpec(name, LayerKind.LINEAR, int(layer.kernel.shape[0]), layer.units, layer.use_bias)
        return DenseLayer(name, layer, spec), None
    if kind is L.Embedding:
        spec = LayerSpec(name, LayerKind.EMBEDDING, layer.input_dim, layer.output_dim, False)
        return EmbeddingLayer(name, layer, spec), None
    if kind in (L.BatchNormalization, L.LayerNormalization):
        if not (layer.scale and layer.center) or getattr(layer, "rms_scaling", False):
            return None, "needs scale=True and center=True (and no rms_scaling)"
        if len(layer.gamma.shape) != 1 or not _normalizes_last_axis(layer):
            return None, "only normalization over the last axis (channels_last) is supported"
        units = int(math.prod(layer.gamma.shape))
        norm = LayerKind.BATCHNORM if kind is L.BatchNormalization else LayerKind.LAYERNORM
        return NormLayer(name, layer, LayerSpec(name, norm, units, units, True)), None
    if getattr(layer, "_trainable_variables", None) and layer.trainable:
        return None, (
            f"hvd_ngd has no curvature block for {kind.__name__} (supported: Dense, Conv2D, Embedding, "
            "BatchNormalization, LayerNormalization); its weights keep their plain averaged gradients"
        )
    return None, None
