"""TensorFlow adapter of hvd_ngd: ``KFAC`` for custom loops (eager or ``tf.function``) and, in
``hvd_ngd.tensorflow.keras``, a ``DistributedOptimizer`` for ``model.fit``. Importing it imports
tensorflow and Keras 3 (not horovod); Keras 3 on the TensorFlow backend is required (``import keras``)."""

from hvd_ngd.tensorflow.preconditioner import KFAC

__all__ = ["KFAC"]
