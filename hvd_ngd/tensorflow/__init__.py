"""TensorFlow adapter of hvd_ngd: ``KFAC`` for custom loops (eager or ``tf.function``) and, in
``hvd_ngd.tensorflow.keras``, a ``DistributedOptimizer`` for ``model.fit``. Importing it imports
tensorflow (not horovod); use tf-keras with ``TF_USE_LEGACY_KERAS=1``."""

from hvd_ngd.tensorflow.preconditioner import KFAC

__all__ = ["KFAC"]
