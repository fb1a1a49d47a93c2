#!/usr/bin/env bash
# Build wick with `--features cuda` on a Linux x86-64 machine that has no CUDA toolkit
# (and no GPU), using only pinned PyPI wheels for nvcc and the headers.
#
#   scripts/build-cuda.sh            -> target/cuda/target/release/wick (+ wick.xz), and the
#                                       unit tests as wick-tests (+ .xz) for the GPU machine
#
# The binary loads the CUDA libraries only when a GPU is asked for (`--device cuda`):
# candle-core is copied from the cargo registry into target/cuda/candle-core and its
# cudarc dependency switched from "dynamic-linking" to "dynamic-loading" (never
# committed), and candle-kernels' `-lcudart` is pointed at the static cudart through a
# linker-script shim. At run time it needs the driver's libcuda.so.1 and CUDA 13 copies of
# libcublas / libcublasLt / libcurand on LD_LIBRARY_PATH.
#
# Knobs: WICK_CUDA_FEATURES (default "cuda"; "cuda,mpi" for data-parallel GPU runs: needs the
#        MPI development files here and the MPI library where it runs),
#        CUDA_COMPUTE_CAP (default 90 = H100/H200; kernels for that capability only),
#        WICK_CUDA_DIR (default target/cuda), CUDAFORGE_THREADS (parallel nvcc jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${WICK_CUDA_DIR:-$ROOT/target/cuda}
VENV=$DIR/venv
CUDA_ROOT_DIR=$DIR/root
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
mkdir -p "$DIR"

# 1. CUDA 13.0 toolchain from PyPI. Pinned to 13.0: nvcc 13.0 emits PTX ISA 9.0, which a
#    driver of the 580 series (CUDA 13.0) can JIT; newer nvcc emits PTX it rejects.
PKGS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85"
[ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q --no-deps --progress-bar off $PKGS
CU="$("$VENV/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
"$CU/bin/nvcc" --version | tail -1

# 2. A CUDA_ROOT layout (bin include nvvm lib64) made of symlinks into the wheels.
rm -rf "$CUDA_ROOT_DIR"
mkdir -p "$CUDA_ROOT_DIR/lib64" "$CUDA_ROOT_DIR/static-shim"
ln -s "$CU/bin" "$CUDA_ROOT_DIR/bin"
ln -s "$CU/include" "$CUDA_ROOT_DIR/include"
ln -s "$CU/nvvm" "$CUDA_ROOT_DIR/nvvm"
for f in "$CU"/lib/*.so.* "$CU"/lib/*.a; do ln -s "$f" "$CUDA_ROOT_DIR/lib64/"; done
export CUDA_ROOT="$CUDA_ROOT_DIR" CUDA_PATH="$CUDA_ROOT_DIR" CUDA_HOME="$CUDA_ROOT_DIR"
export PATH="$CUDA_ROOT_DIR/bin:$PATH"
# candle-kernels asks for -lcudart; resolve it to the static runtime (no .so dependency).
echo "INPUT( $CUDA_ROOT_DIR/lib64/libcudart_static.a -ldl -lrt -lpthread )" \
  > "$CUDA_ROOT_DIR/static-shim/libcudart.so"
export CUDART_SHIM_DIR="$CUDA_ROOT_DIR/static-shim"

# 3. candle-core with cudarc loaded at run time instead of linked.
cargo fetch -q
REG=$(dirname "$(cargo metadata --format-version 1 -q | python3 -c 'import json,sys;print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="candle-core"))')")
if [ ! -f "$DIR/candle-core/.wick-patched" ]; then
  rm -rf "$DIR/candle-core"
  cp -r "$REG" "$DIR/candle-core"
  sed -i 's/"dynamic-linking",/"dynamic-loading",/' "$DIR/candle-core/Cargo.toml"
  grep -q '"dynamic-loading"' "$DIR/candle-core/Cargo.toml"
  touch "$DIR/candle-core/.wick-patched"
fi

# 4. Build into its own target dir; the patch rewrites Cargo.lock, so restore it after.
cp Cargo.lock "$DIR/Cargo.lock.orig"
trap 'cp "$DIR/Cargo.lock.orig" "$ROOT/Cargo.lock"' EXIT
FEATURES=${WICK_CUDA_FEATURES:-cuda}
CARGO_TARGET_DIR="$DIR/target" cargo build --release --features "$FEATURES" \
  --config "patch.crates-io.candle-core.path=\"$DIR/candle-core\""
BIN=$DIR/target/release/wick
if readelf -d "$BIN" | grep NEEDED | grep -Eq 'cuda|cublas|curand'; then
  echo "error: $BIN links CUDA libraries at load time; the dynamic-loading patch did not apply" >&2
  exit 1
fi
xz -T0 -6 -k -f "$BIN"
# The library's unit tests in the same build, for the GPU machine (no Rust toolchain there):
# the `gpu_` tests check wick's CUDA kernels against their CPU versions.
TESTS_BIN=$(CARGO_TARGET_DIR="$DIR/target" cargo test --release --features "$FEATURES" --lib --no-run \
  --config "patch.crates-io.candle-core.path=\"$DIR/candle-core\"" --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m.get("profile", {}) and m["profile"]["test"]:
        print(m["executable"])' | tail -1)
if [ -n "$TESTS_BIN" ]; then
  cp "$TESTS_BIN" "$DIR/target/release/wick-tests"
  xz -T0 -6 -k -f "$DIR/target/release/wick-tests"
  ls -la "$DIR/target/release/wick-tests.xz"
else
  echo "warning: the unit-test binary was not built; gpu-check.sh will skip the kernel tests" >&2
fi
ls -la "$BIN" "$BIN.xz"
echo "built $BIN (CUDA kernels for compute capability $CUDA_COMPUTE_CAP)"
