"""Enumerations used across hvd_ngd (no magic strings in configs)."""

from __future__ import annotations

import enum


class LayerKind(str, enum.Enum):
    """Kinds of layers whose curvature hvd_ngd models."""

    LINEAR = "linear"
    CONV2D = "conv2d"
    EMBEDDING = "embedding"
    BATCHNORM = "batchnorm"
    LAYERNORM = "layernorm"

    @property
    def is_unitwise(self) -> bool:
        """Whether the layer uses unit-wise 2x2 Fisher blocks instead of Kronecker factors."""
        return self in (LayerKind.BATCHNORM, LayerKind.LAYERNORM)


class InverseMethod(str, enum.Enum):
    """How damped Kronecker factors are inverted."""

    EIGEN = "eigen"
    CHOLESKY = "cholesky"


class DampingRule(str, enum.Enum):
    """How the configured ``damping`` becomes each layer's Tikhonov lambda (see ``hvd_ngd.damping``).

    ABSOLUTE: lambda = damping for every layer.
    RELATIVE: lambda = damping * the mean eigenvalue of the layer's curvature block
    ((tr A / dim A)(tr G / dim G) for A (x) G), invariant to the scale of each layer's factors.
    """

    ABSOLUTE = "absolute"
    RELATIVE = "relative"


class FisherType(str, enum.Enum):
    """Which Fisher the factors estimate."""

    EMPIRICAL = "empirical"
    MONTE_CARLO = "mc"


class LossFamily(str, enum.Enum):
    """The training loss as a negative log-likelihood, from which the Monte-Carlo Fisher samples
    labels (``fisher_type='mc'``).

    CROSS_ENTROPY: softmax cross-entropy on logits (classes on the last axis); labels are drawn
        from the categorical distribution softmax(logits).
    MSE: squared error (f - y)^2 per element (torch's ``mse_loss``, Keras' ``MeanSquaredError``);
        it is the negative log-likelihood of N(f, 1/2) up to a constant, so targets are drawn
        as y = f + sqrt(1/2) * eps, eps ~ N(0, I), and E[g g^T] is the loss's Hessian 2I.
    """

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"


class Strategy(str, enum.Enum):
    """Distribution strategy for factors, inverses and preconditioned gradients.

    SPNGD: reduce-scatter factors and gradients to owners, all-gather preconditioned gradients.
    COMM_OPT / MEM_OPT / HYBRID: KAISA; factors allreduced, inverses computed by one rank each
    and broadcast to gradient workers (COMM_OPT), or the preconditioned gradient broadcast
    (MEM_OPT), or a mix decided by ``grad_worker_fraction`` (HYBRID).
    """

    SPNGD = "spngd"
    COMM_OPT = "comm-opt"
    MEM_OPT = "mem-opt"
    HYBRID = "hybrid"


class IntervalPolicy(str, enum.Enum):
    """How often a statistic (factor) and its inverse are refreshed."""

    FIXED = "fixed"
    ADAPTIVE = "adaptive"


class AssignmentCost(str, enum.Enum):
    """Cost model used to balance factor work across ranks."""

    COMPUTE = "compute"  # ~ n^3 (decomposition)
    MEMORY = "memory"  # ~ n^2 (storage / communication)
    COMMUNICATION = "communication"  # gradient elements a layer's owner receives and sends (spngd)


class WireDtype(str, enum.Enum):
    """Element type used to send factors and inverses over the network."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"


class LossReduction(str, enum.Enum):
    """How the user's loss reduces over the batch; G factors need gradients of the summed loss.

    MEAN: captured output gradients are multiplied by the local batch size.
    SUM: captured output gradients are used as they are.
    """

    MEAN = "mean"
    SUM = "sum"
