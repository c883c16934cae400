"""The Keras this adapter is written for: Keras 3 on the TensorFlow backend (``import keras``).

``require_keras()`` is called when ``hvd_ngd.tensorflow`` is imported; ``require_keras_object``
when a model or optimizer is handed to it, so that a tf-keras (Keras 2) object, which the
adapter would capture or average wrongly, is rejected with the fix instead.
"""

from __future__ import annotations

from typing import Any

#: Major version of Keras this adapter supports (and the backend it needs).
KERAS_MAJOR = 3
BACKEND = "tensorflow"


def require_keras() -> Any:
    """The ``keras`` module, after checking it is Keras 3 on the TensorFlow backend.

    Raises:
        ImportError: another Keras major version, or another backend.
    """
    import keras

    major = int(str(keras.__version__).split(".")[0])
    if major != KERAS_MAJOR:
        raise ImportError(
            f"hvd_ngd.tensorflow needs Keras {KERAS_MAJOR} (`pip install keras>=3`), found keras {keras.__version__}"
        )
    backend = keras.backend.backend()
    if backend != BACKEND:
        raise ImportError(
            f"hvd_ngd.tensorflow needs the Keras {BACKEND!r} backend (Horovod's TensorFlow collectives), found "
            f"{backend!r}: set KERAS_BACKEND=tensorflow before importing keras"
        )
    return keras


def is_tf_keras(obj: Any) -> bool:
    """Whether ``obj`` is a tf-keras (Keras 2) object (``TF_USE_LEGACY_KERAS=1`` / ``import tf_keras``)."""
    return any(c.__module__.split(".")[0] == "tf_keras" for c in type(obj).__mro__)


def require_keras_object(obj: Any, base: type, what: str) -> None:
    """Raise unless ``obj`` is a Keras 3 ``base`` instance.

    Args:
        obj: the user's model, layer or optimizer.
        base: the Keras 3 class it must be (``keras.Model``, ``keras.optimizers.Optimizer``, ...).
        what: its role, for the message ("model", "optimizer").

    Raises:
        TypeError: a tf-keras object (with the fix), or another type.
    """
    if isinstance(obj, base):
        return
    if is_tf_keras(obj):
        raise TypeError(
            f"hvd_ngd.tensorflow supports Keras 3 only, got a tf-keras (Keras 2) {what} {type(obj).__name__}: "
            "unset TF_USE_LEGACY_KERAS and build it with `import keras` (Keras 3)"
        )
    raise TypeError(f"hvd_ngd.tensorflow needs a Keras 3 {what} ({base.__module__}.{base.__name__}), got {type(obj)!r}")
