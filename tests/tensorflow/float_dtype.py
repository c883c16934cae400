"""Keras 3's float dtype for the tests: ``set_floatx`` alone does not change the dtype of new
layers once Keras has fixed its global dtype policy (the first layer built does), so both are set."""

import keras


def set_float_dtype(name: str) -> None:
    """New Keras layers and inputs use ``name`` ("float32" or "float64")."""
    keras.backend.set_floatx(name)
    keras.config.set_dtype_policy(name)
