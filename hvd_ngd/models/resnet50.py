"""ResNet-50 (torchvision v1.5 layout) as K-FAC layer specs: 53 conv, 53 BN, 1 FC = 107 layers."""

from __future__ import annotations

from typing import List

from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec


def _conv(name: str, cin: int, cout: int, k: int) -> LayerSpec:
    return LayerSpec(name, LayerKind.CONV2D, cin * k * k, cout, False)


def _bn(name: str, c: int) -> LayerSpec:
    return LayerSpec(name, LayerKind.BATCHNORM, c, c, True)


def resnet50_layer_specs(num_classes: int = 1000) -> List[LayerSpec]:
    """The 107 preconditioned layers of ResNet-50 with their factor sizes."""
    specs = [_conv("conv1", 3, 64, 7), _bn("bn1", 64)]
    inplanes = 64
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
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
    specs.append(LayerSpec("fc", LayerKind.LINEAR, 2048, num_classes, True))
    return specs
