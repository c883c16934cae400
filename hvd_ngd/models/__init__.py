"""Layer shapes of reference models, for planning and benchmarks without a framework."""

from hvd_ngd.models.resnet50 import resnet50_layer_specs

__all__ = ["resnet50_layer_specs"]
