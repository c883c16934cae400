#!/usr/bin/env bash
# One-time, idempotent environment setup for hvd_ngd.
#
# Creates .venv/ with pinned torch (CPU), tensorflow-cpu 2.21 + Keras 3 (and tf-keras for the legacy
# stack), and a horovod 0.28.1 wheel built from the PyPI sdist, PyTorch + TensorFlow + Gloo + MPI
# enabled. Build changes (each needed, see README "Supported versions"): C++17 for torch >= 2.1;
# Debian libhighwayhash-dev + libfarmhash-dev (TF 2.21's wheel omits those headers);
# horovod/tensorflow/xla_mpi_ops.cc dropped from TF_SOURCES (XLA headers moved in TF >= 2.19; the
# XLA ops are only used with HOROVOD_ENABLE_XLA_OPS=1).
# The built wheel is cached outside the repository, keyed by (horovod, torch, tensorflow, python)
# versions, so a second run takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVD_NGD_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
HOROVOD_VERSION="0.28.1"
TORCH_VERSION="2.13.0"
CACHE_ROOT="${HVD_NGD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd_ngd}"

log() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages: Open MPI, the highwayhash/farmhash headers that TF 2.21's wheel omits, and
#    iproute2 + OpenSSH for the multi-host test hosts (network namespaces with an sshd each).
#    Skip when present; never require root when they are already there.
DEB_PKGS="libopenmpi-dev openmpi-bin libhighwayhash-dev libfarmhash-dev iproute2 openssh-client openssh-server"
missing_debs=""
for p in $DEB_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing_debs="$missing_debs $p"; done
if [ -n "$missing_debs" ]; then
  if [ "$(id -u)" = "0" ]; then
    log "installing$missing_debs"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing_debs >/dev/null
  else
    log "ERROR: missing Debian packages and this is not root. Run: sudo apt-get install$missing_debs"
    exit 1
  fi
fi

# 2. Virtual environment with pinned packages.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.hvd_ngd_stamp"
REQS="$ROOT/requirements/env.txt"
want_stamp="$(cat "$REQS" "$0" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want_stamp" ]; then
  log "installing pinned packages (first run: a few minutes)"
  # (pip warns once per package about this machine's missing local index folders: filtered)
  "$PY" -m pip install -q --upgrade "pip<25" wheel setuptools packaging 2>&1 | grep -v "is ignored: it is neither" || true
  "$PY" -m pip install -q -r "$REQS" 2>&1 | grep -v "is ignored: it is neither" || true
  "$PY" -c "import torch, tensorflow, numpy, mpi4py, pytest, sklearn" || { log "ERROR: pinned packages failed to install"; exit 1; }
fi

py_tag="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
torch_v="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
tf_v="$("$PY" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)"
KEY="horovod-${HOROVOD_VERSION}_torch-${torch_v}_tf-${tf_v}_${py_tag}"
WHEEL_DIR="$CACHE_ROOT/wheels/$KEY"

# 3. Horovod wheel: build once per key, then reuse.
if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
  log "building horovod $HOROVOD_VERSION for $KEY (10-25 minutes, once)"
  BUILD="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$BUILD" "horovod==$HOROVOD_VERSION"
  tar -xzf "$BUILD/horovod-$HOROVOD_VERSION.tar.gz" -C "$BUILD"
  SRC="$BUILD/horovod-$HOROVOD_VERSION"
  # torch >= 2.1 headers need C++17; the sdist forces C++14.
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$SRC/CMakeLists.txt" || { log "ERROR: C++17 patch did not apply"; exit 1; }
  # TF >= 2.19 moved the XLA headers xla_mpi_ops.cc includes; those ops only serve HOROVOD_ENABLE_XLA_OPS=1.
  sed -i 's#"[^"]*xla_mpi_ops\.cc"##' "$SRC/horovod/tensorflow/CMakeLists.txt"
  ! grep -q 'xla_mpi_ops.cc' "$SRC/horovod/tensorflow/CMakeLists.txt" || { log "ERROR: XLA patch did not apply"; exit 1; }
  mkdir -p "$WHEEL_DIR.tmp"
  if ! (cd "$SRC" && HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
        HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$WHEEL_DIR.tmp" . >"$BUILD/build.log" 2>&1); then
    log "ERROR: horovod build failed; relevant lines of $BUILD/build.log:"
    grep -iE 'error|fatal|not found' "$BUILD/build.log" | tail -40
    exit 1
  fi
  rm -rf "$WHEEL_DIR"; mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
  rm -rf "$BUILD"
fi
if ! "$PY" -c 'import horovod' 2>/dev/null || [ "$("$PY" -c 'import horovod; print(horovod.__version__)')" != "$HOROVOD_VERSION" ] \
   || [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want_stamp" ]; then
  log "installing cached horovod wheel from $WHEEL_DIR"
  "$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
  "$PY" -m pip install -q cloudpickle psutil pyyaml cffi 2>&1 | grep -v "is ignored: it is neither" || true
  "$PY" -m pip install -q --no-deps -e "$ROOT" 2>&1 | grep -vE "is ignored: it is neither|DEPRECATION" || true
fi

# 4. Prove the build: horovodrun --check-build must list every framework and controller.
CHECK="$("$VENV/bin/horovodrun" --check-build 2>&1)"
missing=""
for item in PyTorch TensorFlow MPI Gloo; do
  echo "$CHECK" | grep -qE "\[X\] $item" || missing="$missing $item"
done
if [ -n "$missing" ]; then
  log "ERROR: horovod is missing:$missing"
  echo "$CHECK"
  exit 1
fi
echo "$want_stamp" >"$STAMP"
"$PY" -c "import hvd_ngd" || { log "ERROR: hvd_ngd is not importable from $VENV"; exit 1; }
log "ready: $VENV (horovod $HOROVOD_VERSION, torch $torch_v, tensorflow $tf_v; PyTorch TensorFlow MPI Gloo)"
