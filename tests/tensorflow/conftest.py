"""Shared fixtures of the TensorFlow tests (tf-keras: ``TF_USE_LEGACY_KERAS=1``)."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture
def float64():
    """Keras layers built in the test use float64 (exact comparisons); float32 again afterwards."""
    tf.keras.backend.set_floatx("float64")
    yield
    tf.keras.backend.set_floatx("float32")
