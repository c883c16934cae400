"""Layer shapes of reference models, for planning and benchmarks without a framework."""

from hvd_ngd.models.bert import bert_large_layer_specs
from hvd_ngd.models.resnet50 import resnet50_layer_specs

__all__ = ["bert_large_layer_specs", "resnet50_layer_specs"]
