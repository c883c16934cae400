"""Multi-rank TensorFlow tests run under horovodrun: initialise Horovod once per rank."""

import os

os.environ.pop("TF_USE_LEGACY_KERAS", None)  # Keras 3
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")

import horovod.tensorflow as hvd  # noqa: E402

hvd.init()
