"""Test utilities that need no cluster: an in-process multi-rank world."""

from hvd_ngd.testing.threaded_world import ThreadedCommunicator, ThreadedWorld

__all__ = ["ThreadedCommunicator", "ThreadedWorld"]
