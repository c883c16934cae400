"""The core imports no framework: every hvd_ngd module outside the adapters (torch/,
tensorflow/, and horovod/ which both share) imports in a process where importing torch,
tensorflow, horovod or keras raises."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "tensorflow", "horovod", "keras", "tf_keras"):
                raise ImportError(f"blocked framework import: {name}")
            return None

    sys.meta_path.insert(0, Block())
    import hvd_ngd
    names = []
    for info in pkgutil.walk_packages(hvd_ngd.__path__, "hvd_ngd."):
        if info.name.startswith(("hvd_ngd.torch", "hvd_ngd.tensorflow", "hvd_ngd.horovod")):
            continue
        importlib.import_module(info.name)
        names.append(info.name)
    print(len(names), "modules")
    assert "hvd_ngd.preconditioner" in names and "hvd_ngd.strategies.spngd" in names
    """
)


def test_core_imports_without_frameworks() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[0]) >= 20
