"""What both adapters share about Horovod (like ``horovod/common``): process sets, byte accounting
and object collectives, with the framework module (``horovod.torch`` / ``horovod.tensorflow``)
injected. Imports ``horovod.common``, never torch or tensorflow; not part of the core."""
