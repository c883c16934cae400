"""ResNet-50 (torchvision v1.5 layout) as K-FAC layer specs: 53 conv, 53 BN, 1 FC = 107 layers."""

from __future__ import annotations

from typing import List

from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec


def _conv(name: str, cin: int, cout: int, k: int) -> LayerSpec:
    return LayerSpec(name, LayerKind.CONV2D, cin * k * k, cout, False)


def _bn(name: str, c: int) -> LayerSpec:
    return LayerSpec(name, LayerKind.BATCHNORM, c, c, True)


def resnet50_layer_specs(num_classes: int = 1000, width: int = 64) -> List[LayerSpec]:
    """The 107 preconditioned layers of ResNet-50 with their factor sizes.

    Args:
        num_classes: outputs of the classifier.
        width: channels of the stem and of the first stage's bottlenecks (64 is ResNet-50;
            smaller values scale every stage alike, for benchmarks that must run in seconds).
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"resnet50_layer_specs: width={width!r} must be an int >= 1")
    specs = [_conv("conv1", 3, width, 7), _bn("bn1", width)]
    inplanes = width
    stages = [(width, 3), (2 * width, 4), (4 * width, 6), (8 * width, 3)]
    for stage, (planes, blocks) in enumerate(stages, start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            specs += [
                _conv(f"{p}.conv1", inplanes, planes, 1),
                _bn(f"{p}.bn1", planes),
                _conv(f"{p}.conv2", planes, planes, 3),
                _bn(f"{p}.bn2", planes),
                _conv(f"{p}.conv3", planes, planes * 4, 1),
                _bn(f"{p}.bn3", planes * 4),
            ]
            if b == 0:
                specs += [_conv(f"{p}.downsample.0", inplanes, planes * 4, 1), _bn(f"{p}.downsample.1", planes * 4)]
            inplanes = planes * 4
    specs.append(LayerSpec("fc", LayerKind.LINEAR, inplanes, num_classes, True))
    return specs
