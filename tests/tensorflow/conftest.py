"""Shared fixtures of the TensorFlow tests: Keras 3 (``import keras``) on TensorFlow 2.21."""

import os

os.environ.pop("TF_USE_LEGACY_KERAS", None)  # Keras 3: tf.keras must not switch to tf-keras either
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from tests.tensorflow.float_dtype import set_float_dtype  # noqa: E402


@pytest.fixture
def float64():
    """Keras layers built in the test use float64 (exact comparisons); float32 again afterwards."""
    set_float_dtype("float64")
    yield
    set_float_dtype("float32")
