"""``register_layers``: skip patterns first (silently), then the adapter's verdict (unsupported
configurations warn with the reason, unknown types stay silent), and a clear error when nothing
is left."""

from __future__ import annotations

import warnings

import pytest

from hvd_ngd.registration import register_layers


class Dense:
    pass


class Conv:
    pass


class ReLU:
    pass


def make_layer(name, layer):
    if isinstance(layer, Dense):
        return name, None
    if isinstance(layer, Conv):
        return None, "groups=2 is not supported"
    return None, None


def test_order_skips_and_warnings() -> None:
    named = [("conv", Conv()), ("act", ReLU()), ("fc1", Dense()), ("head", Dense()), ("skipped_conv", Conv())]
    with pytest.warns(UserWarning, match="'conv' \\(Conv\\): groups=2") as caught:
        layers, skipped = register_layers(named, make_layer, ["^head$", "skipped_"], adapter="a", supported="s",
                                          model_name="m")
    assert layers == ["fc1"]
    assert skipped == {"conv": "groups=2 is not supported", "head": "matched skip_layers",
                       "skipped_conv": "matched skip_layers"}
    assert len(caught) == 1  # matching skip_layers silences the warning; ReLU is silent


def test_class_names_match_skip_patterns_and_nothing_left_is_an_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"hvd_ngd.x.KFAC found no supported layer \(Dense\) in net; skipped: "
                                             r"\{'fc': 'matched skip_layers'\}"):
            register_layers([("fc", Dense()), ("act", ReLU())], make_layer, ["^Dense$"], adapter="hvd_ngd.x",
                            supported="Dense", model_name="net")
