#!/usr/bin/env bash
# quickstart.sh [cnn-gpu train options] -- set up and train the seed network on Fashion-MNIST.
#
# Makes a virtual environment in .venv, installs cnn_gpu with its Numba, progress-bar and plot extras
# (and CuPy when an NVIDIA driver is present), installs Debian's dataset-fashion-mnist package
# where apt may be used (otherwise `cnn-gpu train` downloads the files into ~/.cache/cnn_gpu),
# then runs `cnn-gpu train` with the options given.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
extras="all"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras="all,gpu"  # CuPy for CUDA 12; see the README for other CUDA versions
fi
python -m pip install -q -e ".[$extras]"

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo"; else sudo="none"; fi
  if [ "$sudo" != none ]; then
    ($sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "note: apt could not install dataset-fashion-mnist; cnn-gpu will download the files"
  fi
fi

exec cnn-gpu train "$@"
