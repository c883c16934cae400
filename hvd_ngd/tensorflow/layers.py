"""Per-Keras-layer capture: canonical layouts and gradient matrices.

Each supported layer's ``call`` is wrapped so that every forward pass records its input and its
*pre-activation* output z (Dense/Conv2D run with a linear activation, then the activation is
applied), so that ``tape.gradient(loss, z)`` gives the output gradient the G factor needs.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import tensorflow as tf

from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec

keras = tf.keras


class KerasLayer:
    """A registered Keras layer: spec, capture, and gradient-matrix conversion."""

    kind: LayerKind

    def __init__(self, name: str, layer: Any, spec: LayerSpec) -> None:
        self.name = name
        self.layer = layer
        self.spec = spec
        self.records: List[Tuple[tf.Tensor, tf.Tensor]] = []  # (input, pre-activation output)

    def variables(self) -> List[tf.Variable]:
        """Variables preconditioned by this layer (weight first, then bias)."""
        raise NotImplementedError

    def a_input(self, x: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def g_output(self, g: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def grad_matrix(self, grads: List[tf.Tensor]) -> tf.Tensor:
        raise NotImplementedError

    def split_matrix(self, mat: tf.Tensor) -> List[tf.Tensor]:
        raise NotImplementedError

    def wrap(self) -> None:
        """Install the recording ``call``."""
        original = self.layer.call
        activation = getattr(self.layer, "activation", None)
        linear = keras.activations.get("linear")
        records = self.records

        def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if activation is not None:
                self.layer.activation = linear
            try:
                z = original(inputs, *args, **kwargs)
            finally:
                if activation is not None:
                    self.layer.activation = activation
            records.append((inputs, z))
            return activation(z) if activation is not None else z

        self.layer.call = call


class DenseLayer(KerasLayer):
    kind = LayerKind.LINEAR

    def variables(self) -> List[tf.Variable]:
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
    """Conv2D, channels_last, groups=1, dilation 1: patches in the kernel's (i, j, c) order."""

    kind = LayerKind.CONV2D

    def a_input(self, x: tf.Tensor) -> tf.Tensor:
        kh, kw = self.layer.kernel_size
        sh, sw = self.layer.strides
        patches = tf.image.extract_patches(x, [1, kh, kw, 1], [1, sh, sw, 1], [1, 1, 1, 1], self.layer.padding.upper())
        n = tf.shape(patches)[0]
        return tf.reshape(patches, (n, -1, patches.shape[-1]))

    def g_output(self, g: tf.Tensor) -> tf.Tensor:
        return tf.reshape(g, (tf.shape(g)[0], -1, g.shape[-1]))


class EmbeddingLayer(KerasLayer):
    kind = LayerKind.EMBEDDING

    def variables(self) -> List[tf.Variable]:
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
    """BatchNormalization / LayerNormalization over the last axis: unit-wise blocks."""

    def variables(self) -> List[tf.Variable]:
        return [self.layer.gamma, self.layer.beta]

    def to_ncl(self, t: tf.Tensor) -> tf.Tensor:
        units = self.spec.out_features
        return tf.transpose(tf.reshape(t, (tf.shape(t)[0], -1, units)), (0, 2, 1))

    def x_hat(self, y: tf.Tensor) -> tf.Tensor:
        gamma = tf.reshape(self.layer.gamma, (1, -1, 1))
        beta = tf.reshape(self.layer.beta, (1, -1, 1))
        safe = tf.where(gamma == 0, tf.ones_like(gamma), gamma)
        x_hat = (self.to_ncl(y) - beta) / safe
        return tf.where(gamma == 0, tf.zeros_like(x_hat), x_hat)

    def g_output(self, g: tf.Tensor) -> tf.Tensor:
        return self.to_ncl(g)

    def grad_matrix(self, grads: List[tf.Tensor]) -> tf.Tensor:
        return tf.stack([tf.reshape(grads[0], (-1,)), tf.reshape(grads[1], (-1,))], 0)

    def split_matrix(self, mat: tf.Tensor) -> List[tf.Tensor]:
        return [tf.reshape(mat[0], self.layer.gamma.shape), tf.reshape(mat[1], self.layer.beta.shape)]


def make_layer(name: str, layer: Any) -> Tuple[Optional[KerasLayer], Optional[str]]:
    """A ``KerasLayer`` for a supported layer, or (None, reason)."""
    L = keras.layers
    if isinstance(layer, L.Conv2D) and type(layer) is L.Conv2D:
        if layer.groups != 1 or tuple(layer.dilation_rate) != (1, 1) or layer.data_format != "channels_last":
            return None, "only groups=1, dilation 1, channels_last Conv2D is supported"
        kh, kw = layer.kernel_size
        cin = int(layer.kernel.shape[2])
        spec = LayerSpec(name, LayerKind.CONV2D, kh * kw * cin, layer.filters, layer.use_bias)
        return Conv2DLayer(name, layer, spec), None
    if type(layer) is L.Dense:
        spec = LayerSpec(name, LayerKind.LINEAR, int(layer.kernel.shape[0]), layer.units, layer.use_bias)
        return DenseLayer(name, layer, spec), None
    if type(layer) is L.Embedding:
        spec = LayerSpec(name, LayerKind.EMBEDDING, layer.input_dim, layer.output_dim, False)
        return EmbeddingLayer(name, layer, spec), None
    if type(layer) in (L.BatchNormalization, L.LayerNormalization):
        if len(layer.gamma.shape) != 1:
            return None, "only normalization over one (the last) axis is supported"
        if not (layer.scale and layer.center):
            return None, "needs scale=True and center=True"
        units = int(math.prod(layer.gamma.shape))
        kind = LayerKind.BATCHNORM if type(layer) is L.BatchNormalization else LayerKind.LAYERNORM
        spec = LayerSpec(name, kind, units, units, True)
        norm = NormLayer(name, layer, spec)
        norm.kind = kind
        return norm, None
    return None, None
