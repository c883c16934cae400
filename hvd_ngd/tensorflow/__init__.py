"""TensorFlow adapter of hvd_ngd (work in progress: eager custom loops). Importing it imports
tensorflow; use tf-keras with ``TF_USE_LEGACY_KERAS=1``."""

from hvd_ngd.tensorflow.preconditioner import KFAC

__all__ = ["KFAC"]
