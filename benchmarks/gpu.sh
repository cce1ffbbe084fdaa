#!/usr/bin/env bash
# The GPU check: the overhead benchmark and a short keras-tuner sweep, with
# Keras on JAX, on a CUDA machine that has JAX with CUDA but no network and
# no TensorFlow. Prints absolute epoch times and the ratios.
#
# On a machine with network, from the repository root, bundle what the GPU
# machine lacks (the wheels of keras, keras-tuner, namex and optree for its
# Python, and the MNIST IDX files):
#
#     benchmarks/gpu.sh prepare [PYTHON_VERSION=3.12] [IDX_DIR=../shared/data/mnist]
#
# The GPU machine must already have what those need: numpy, absl-py, rich,
# h5py, ml-dtypes, packaging, grpcio, protobuf, six, requests, matplotlib,
# scipy and scikit-learn (the sweep's Bayesian tuner); `run` checks first.
# To bundle some of them too: EXTRA_WHEELS="rich==14.0.0 six" gpu.sh prepare.
#
# Then, on the GPU machine, with the repository and benchmarks/gpu_bundle/:
#
#     benchmarks/gpu.sh run [OUTPUT_DIR=benchmarks/results]
#
# It fits in 5 minutes on one recent GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=benchmarks/gpu_bundle
WHEELS=(keras==3.15.1 keras-tuner==1.4.8 namex==0.1.0 optree==0.20.0)

prepare() {
  local python_version=${1:-3.12} idx_dir=${2:-../shared/data/mnist}
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels" "$BUNDLE/mnist"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$BUNDLE/wheels" "${WHEELS[@]}" ${EXTRA_WHEELS:-}
  cp "$idx_dir"/*-ubyte* "$BUNDLE/mnist/"
  du -sh "$BUNDLE"
}

run() {
  local output_dir=${1:-benchmarks/results}
  local site
  site=$(mktemp -d)
  python3 -m pip install --quiet --no-index --no-deps --no-compile \
    --no-cache-dir --target "$site" "$BUNDLE"/wheels/*.whl
  export PYTHONPATH="$site:$PWD" KERAS_BACKEND=jax PYTHONUNBUFFERED=1
  mkdir -p "$output_dir"
  if ! python3 -c "import kd_keras, keras_tuner, sklearn"; then
    echo "kd_keras cannot be imported here: bundle the missing packages" \
      "(EXTRA_WHEELS, see the top of $0) and run again." >&2
    exit 1
  fi
  python3 -c "import jax; print('JAX devices:', jax.devices())"
  python3 benchmarks/overhead.py --backend jax --epochs 6 \
    --idx_dir "$BUNDLE/mnist" --output "$output_dir/overhead_jax_gpu.json"
  python3 benchmarks/sweep.py --backend jax --pipeline array_batches --quick \
    --idx_dir "$BUNDLE/mnist" --output_dir "$output_dir"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 prepare [PYTHON_VERSION] [IDX_DIR] | run [OUTPUT_DIR]" >&2
     exit 2 ;;
esac
