#!/usr/bin/env bash
# The GPU check of wick's CUDA build, on a machine with an NVIDIA GPU (a few minutes):
#   -. wick's CUDA kernels against their CPU versions (the unit tests named gpu_, from the
#      wick-tests binary scripts/build-cuda.sh leaves next to wick)
#   0. clear errors for a bad GPU index and for missing CUDA libraries
#   1. the tiny preset, 20 steps, on cuda (f32) and on the CPU from the same seed:
#      losses agree to 1e-3 relative; gradients through NCCL (world size 1, WICK_NCCL=1)
#      change nothing, and a missing NCCL is a clear error; wick's CUDA kernels (AdamW, causal softmax; off unless
#      WICK_GPU_KERNELS=1) and the explicit-backward tensor step (WICK_GPU_STEP=tensor) agree
#      with the default path to 1e-4; the CPU run's
#      checkpoint then resumes on cuda
#   2. a bf16 run whose loss falls
#   3. SIGINT during a cuda run -> exit 130 and a checkpoint that loads (and resumes) on the CPU
#   4. `wick repl` and `wick test tests/regress` (golden loss curve) on the GPU
#   5. tokens/s of the small config and of a 124M llama in bf16, beside PyTorch
#      (shared/bench/torch_llama.py, when TORCH_BENCH points at it) on the same GPU, as ratios;
#      per-phase ms, MFU and peak GPU memory; the same with wick's kernels, and with the tensor
#      step
#
# usage: scripts/gpu-check.sh [WICK]   WICK defaults to target/cuda/target/release/wick;
#        a WICK.xz next to it is unpacked first. Results go to $RESULTS (default gpu-check-out/):
#        summary.txt plus the logs and JSON of every step. Exit 0 when every check passed.
set -uo pipefail
cd "$(dirname "$0")/.."
WICK=${1:-target/cuda/target/release/wick}
RESULTS=${RESULTS:-gpu-check-out}
mkdir -p "$RESULTS"
SUMMARY=$RESULTS/summary.txt
: >"$SUMMARY"
FAILED=0
say() { echo "$*" | tee -a "$SUMMARY"; }
check() { # check NAME CONDITION-EXIT-CODE DETAIL
  if [ "$2" = 0 ]; then say "PASS $1: $3"; else say "FAIL $1: $3"; FAILED=1; fi
}

if [ ! -x "$WICK" ] && [ -f "$WICK.xz" ]; then xz -dkf "$WICK.xz" && chmod +x "$WICK"; fi
[ -x "$WICK" ] || { say "FAIL setup: no wick binary at $WICK (build it with scripts/build-cuda.sh)"; exit 1; }
WICK=$(realpath "$WICK")

# --- CUDA 13 libraries: cuBLAS(Lt) and cuRAND, loaded by the binary at run time ---------
lib_dir() { # the first directory holding $1
  local d sp
  for d in ${CUDA_LIB_DIRS:-} /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -e "$d/$1" ] && { echo "$d"; return; }
  done
  for sp in $(python3 -c 'import site,sys; print(" ".join(site.getsitepackages()+sys.path))' 2>/dev/null); do
    for d in "$sp/nvidia/cu13/lib" "$sp/nvidia/cublas/lib" "$sp/nvidia/curand/lib"; do
      [ -e "$d/$1" ] && { echo "$d"; return; }
    done
  done
  find /usr /opt /root -name "$1" -print -quit 2>/dev/null | xargs -r dirname
}
LIBS=""
for l in libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
  d=$(lib_dir "$l")
  if [ -z "$d" ]; then say "FAIL setup: $l not found"; exit 1; fi
  case ":$LIBS:" in *":$d:"*) ;; *) LIBS=${LIBS:+$LIBS:}$d ;; esac
done
export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
say "libraries: $LIBS"
# NCCL (data-parallel gradients on GPUs) is loaded by the name libnccl.so; PyTorch's wheel and
# Debian's libnccl2 ship only libnccl.so.2: link it under that name in a directory of our own.
NCCL_LINK_DIR=$(realpath "$RESULTS")/nccl-lib
NCCL2=""
for sp in $(python3 -c 'import site,sys; print(" ".join(site.getsitepackages()+sys.path))' 2>/dev/null); do
  [ -e "$sp/nvidia/nccl/lib/libnccl.so.2" ] && { NCCL2="$sp/nvidia/nccl/lib/libnccl.so.2"; break; }
done
[ -n "$NCCL2" ] || NCCL2=$(ldconfig -p | awk '/libnccl.so.2 /{print $NF; exit}')
[ -n "$NCCL2" ] || NCCL2=$(find /usr /opt -name 'libnccl.so.2' -print -quit 2>/dev/null)
if [ -n "$NCCL2" ]; then
  mkdir -p "$NCCL_LINK_DIR" && ln -sf "$NCCL2" "$NCCL_LINK_DIR/libnccl.so"
  export LD_LIBRARY_PATH=$NCCL_LINK_DIR:$LD_LIBRARY_PATH
  say "nccl: $NCCL2"
else
  say "nccl: libnccl.so.2 not found (the NCCL checks will fail)"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
export RUST_BACKTRACE=0

# --- 0. errors, not crashes ---------------------------------------------------------------
"$WICK" run scripts/gpu-check.lua --device cuda:97 --ckpt-dir "$RESULTS/e0" -- 1 >"$RESULTS/e0.log" 2>&1
rc=$?; grep -q "cuda:97" "$RESULTS/e0.log"; check "bad GPU index" $(( rc == 2 ? $? : 1 )) "exit $rc: $(grep -m1 error "$RESULTS/e0.log")"
env LD_LIBRARY_PATH=/nonexistent "$WICK" run scripts/gpu-check.lua --device cuda --ckpt-dir "$RESULTS/e1" -- 1 >"$RESULTS/e1.log" 2>&1
rc=$?
if ldconfig -p | grep -q 'libcublas.so.13'; then
  say "SKIP missing cuBLAS: the system's default library path has cuBLAS 13 (exit $rc)"
else
  grep -q "cannot load CUDA" "$RESULTS/e1.log"; check "missing cuBLAS" $(( rc == 2 ? $? : 1 )) "exit $rc: $(grep -m1 error "$RESULTS/e1.log")"
fi

# --- kernels: wick's CUDA kernels against their CPU versions (the unit tests named gpu_) ---------
TESTS=$(dirname "$WICK")/wick-tests
if [ ! -x "$TESTS" ] && [ -f "$TESTS.xz" ]; then xz -dkf "$TESTS.xz" && chmod +x "$TESTS"; fi
if [ -x "$TESTS" ]; then
  timeout 300 "$TESTS" gpu_ --test-threads 1 --nocapture >"$RESULTS/kernel-tests.log" 2>&1; rc=$?
  ! grep -q "gpu test skipped" "$RESULTS/kernel-tests.log"; skipped=$?
  check "kernel tests (gpu_*) against the CPU" $(( rc == 0 && skipped == 0 ? 0 : 1 )) "$(grep -E 'test result|skipped|panicked' "$RESULTS/kernel-tests.log" | head -3 | tr '\n' ' ')"
else
  say "SKIP kernel tests: no wick-tests binary next to $WICK"
fi

# --- 1. CPU vs CUDA, f32, same seed --------------------------------------------------------
losses() { python3 -c 'import json,sys; print(json.dumps([json.loads(l)["step_loss"] for l in open(sys.argv[1]) if "step_loss" in l]))' "$1"; }
t0=$(date +%s.%N)
timeout 300 "$WICK" run scripts/gpu-check.lua --device cpu --ckpt-dir "$RESULTS/cpu" -- 20 >"$RESULTS/cpu.log" 2>&1; rc_cpu=$?
t1=$(date +%s.%N)
timeout 300 "$WICK" run scripts/gpu-check.lua --device cuda --ckpt-dir "$RESULTS/cuda" -- 20 >"$RESULTS/cuda.log" 2>&1; rc_cuda=$?
t2=$(date +%s.%N)
say "cpu run exit $rc_cpu ($(python3 -c "print(round($t1-$t0,1))") s), cuda run exit $rc_cuda ($(python3 -c "print(round($t2-$t1,1))") s)"
# same_losses A B TOL: 20 logged step losses in each metrics file, within TOL relative.
same_losses() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
a = [json.loads(l)["step_loss"] for l in open(sys.argv[1]) if "step_loss" in l]
b = [json.loads(l)["step_loss"] for l in open(sys.argv[2]) if "step_loss" in l]
rel = max((abs(x - y) / abs(x) for x, y in zip(a, b)), default=float("inf"))
print(f"steps {len(a)}/{len(b)}  first {a[0]:.6f}/{b[0]:.6f}  last {a[-1]:.6f}/{b[-1]:.6f}  max rel diff {rel:.2e}" if a and b else f"steps {len(a)}/{len(b)}")
sys.exit(0 if len(a) == len(b) == 20 and rel < float(sys.argv[3]) else 1)
PY
}
same_losses "$RESULTS/cpu/metrics.jsonl" "$RESULTS/cuda/metrics.jsonl" 1e-3 >"$RESULTS/parity.txt" 2>&1
check "cpu vs cuda f32 losses" $? "$(cat "$RESULTS/parity.txt" | tail -1)"
# wick's own CUDA kernels (AdamW, causal softmax; on with WICK_GPU_KERNELS=1) and the
# explicit-backward tensor step (WICK_GPU_STEP=tensor), against the default path.
for k in "kernels WICK_GPU_KERNELS=1" "tensor-step WICK_GPU_STEP=tensor"; do
  set -- $k
  timeout 300 env "$2" "$WICK" run scripts/gpu-check.lua --device cuda --ckpt-dir "$RESULTS/cuda-$1" -- 20 >"$RESULTS/cuda-$1.log" 2>&1; rc=$?
  same_losses "$RESULTS/cuda/metrics.jsonl" "$RESULTS/cuda-$1/metrics.jsonl" 1e-4 >"$RESULTS/$1.txt" 2>&1
  r=$?; check "cuda: $2 agrees with the default path" $(( rc == 0 ? r : 1 )) "exit $rc; $(tail -1 "$RESULTS/$1.txt")"
done
# NCCL, world size 1 (WICK_NCCL=1): the data-parallel GPU path (flat gradient buffer,
# ncclAllReduce Avg on candle's stream) must leave a run unchanged; without the library, a clear
# error before training (exit 2), not a crash.
timeout 300 env WICK_NCCL=1 "$WICK" run scripts/gpu-check.lua --device cuda --ckpt-dir "$RESULTS/cuda-nccl" -- 20 >"$RESULTS/cuda-nccl.log" 2>&1; rc=$?
same_losses "$RESULTS/cuda/metrics.jsonl" "$RESULTS/cuda-nccl/metrics.jsonl" 1e-6 >"$RESULTS/nccl.txt" 2>&1
r=$?; check "cuda: gradients through NCCL (world size 1) leave the run unchanged" $(( rc == 0 ? r : 1 )) "exit $rc; $(tail -1 "$RESULTS/nccl.txt"); $(grep -m1 -i error "$RESULTS/cuda-nccl.log")"
if ldconfig -p | grep -q 'libnccl.so '; then
  say "SKIP missing NCCL: the system's default library path has libnccl.so"
else
  env WICK_NCCL=1 LD_LIBRARY_PATH=$LIBS "$WICK" run scripts/gpu-check.lua --device cuda --ckpt-dir "$RESULTS/e2" -- 1 >"$RESULTS/e2.log" 2>&1; rc=$?
  grep -q "NCCL" "$RESULTS/e2.log" && ! grep -q "panicked" "$RESULTS/e2.log"
  check "missing NCCL" $(( rc == 2 ? $? : 1 )) "exit $rc: $(grep -m1 error "$RESULTS/e2.log")"
fi
# ... and the CPU run's checkpoint continues on the GPU (the reverse of step 3).
timeout 300 "$WICK" run scripts/gpu-check.lua --device cuda --ckpt-dir "$RESULTS/cpu" --resume -- 23 >"$RESULTS/cpu-to-cuda.log" 2>&1; rc=$?
moved=$("$WICK" inspect --json "$RESULTS/cpu/full_model.ckpt" 2>/dev/null | python3 -c 'import json,sys; m=json.load(sys.stdin); print(m["step"], m["device"])')
[ "$moved" = "23 cuda:0" ]; check "cpu checkpoint resumes on cuda" $(( rc == 0 ? $? : 1 )) "exit $rc, now at step/device: $moved"

# --- 2. bf16 learns ------------------------------------------------------------------------
timeout 300 "$WICK" run scripts/gpu-check.lua --device cuda --dtype bf16 --ckpt-dir "$RESULTS/bf16" -- 60 3e-3 >"$RESULTS/bf16.log" 2>&1; rc=$?
python3 - "$RESULTS/bf16/metrics.jsonl" >"$RESULTS/bf16.txt" 2>&1 <<'PY'
import json, sys
a = [json.loads(l)["step_loss"] for l in open(sys.argv[1]) if "step_loss" in l]
head, tail = sum(a[:3]) / 3, sum(a[-5:]) / 5
print(f"steps {len(a)}  first-3 mean {head:.4f}  last-5 mean {tail:.4f}")
sys.exit(0 if len(a) == 60 and tail < head - 0.5 else 1)
PY
r=$?; check "bf16 loss falls" $(( rc == 0 ? r : 1 )) "exit $rc; $(tail -1 "$RESULTS/bf16.txt")"
"$WICK" inspect "$RESULTS/bf16/full_model.ckpt" >"$RESULTS/bf16-inspect.txt" 2>&1
check "bf16 checkpoint verifies on the CPU side" $? "$(grep -m1 -i dtype "$RESULTS/bf16-inspect.txt" || head -1 "$RESULTS/bf16-inspect.txt")"

# --- 3. SIGINT during a cuda run -------------------------------------------------------------
SIG=$RESULTS/sigint
"$WICK" run scripts/gpu-check.lua --device cuda --ckpt-dir "$SIG" -- 1000000 >"$RESULTS/sigint.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
  [ -f "$SIG/metrics.jsonl" ] && [ "$(wc -l <"$SIG/metrics.jsonl")" -ge 30 ] && break
  sleep 0.1
done
kill -INT $pid; wait $pid; rc=$?
check "SIGINT exit code" $(( rc == 130 ? 0 : 1 )) "exit $rc"
step=$("$WICK" inspect --json "$SIG/full_model.ckpt" 2>"$RESULTS/sigint-inspect.err" | python3 -c 'import json,sys; print(json.load(sys.stdin)["step"])')
check "SIGINT checkpoint verifies" $? "step ${step:-?}"
timeout 300 "$WICK" run scripts/gpu-check.lua --device cpu --ckpt-dir "$SIG" --resume -- $(( ${step:-0} + 3 )) >"$RESULTS/sigint-resume.log" 2>&1; rc=$?
step2=$("$WICK" inspect --json "$SIG/full_model.ckpt" 2>/dev/null | python3 -c 'import json,sys; m=json.load(sys.stdin); print(m["step"], m["device"])')
check "cuda checkpoint resumes on the CPU" $(( rc == 0 ? 0 : 1 )) "exit $rc, now at step/device: $step2"

# --- 4. the other entry points on the GPU: the REPL and the regression suite --------------
echo 'print(wick.device, wick.dtype); local m = wick.model{ preset = "tiny" }; print(m.params)' |
  timeout 120 "$WICK" repl --device cuda --ckpt-dir "$RESULTS/repl" >"$RESULTS/repl.log" 2>&1; rc=$?
grep -q "cuda:0" "$RESULTS/repl.log"; check "repl on cuda" $(( rc == 0 ? $? : 1 )) "exit $rc: $(grep -m1 cuda "$RESULTS/repl.log")"
timeout 300 "$WICK" test tests/regress --device cuda >"$RESULTS/regress.log" 2>&1; rc=$?
check "wick test tests/regress on cuda" $rc "$(tail -1 "$RESULTS/regress.log")"

# --- 5. throughput beside PyTorch, bf16 -------------------------------------------------------
TB=${TORCH_BENCH:-}
for cfg in "small 288 6 6 32000 256" "124m 768 12 12 32000 1024"; do
  set -- $cfg
  timeout 240 "$WICK" bench train --device cuda --dtype bf16 --configs "$1" --steps 20 --warmup 3 \
    >"$RESULTS/bench-$1.json" 2>"$RESULTS/bench-$1.err"
  w=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tokens_per_s"])' "$RESULTS/bench-$1.json" 2>/dev/null)
  line="wick $1 bf16: ${w:-failed} tokens/s"
  if [ -n "$TB" ] && [ -f "$TB" ]; then
    timeout 240 python3 "$TB" --device cuda --dtype bf16 --quiet --dim "$2" --n-layers "$3" --n-heads "$4" \
      --vocab "$5" --seq "$6" --batch 8 --warmup 3 --steps 20 >"$RESULTS/torch-$1.json" 2>"$RESULTS/torch-$1.err"
    t=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["tokens_per_s"])' "$RESULTS/torch-$1.json" 2>/dev/null)
    ratio=$(python3 -c "print(round(${w:-0}/${t:-1}, 3))" 2>/dev/null)
    line="$line; torch ${t:-failed} tokens/s; wick/torch ${ratio:-?}"
  fi
  [ -n "$w" ]; check "bench $1" $? "$line"
  say "  wick $1: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("forward", r["forward_ms"], "backward", r["backward_ms"], "optimizer", r["optimizer_ms"], "ms; MFU", r["mfu"], "; peak GPU memory", r["peak_gpu_mem_mb"], "MiB")' "$RESULTS/bench-$1.json" 2>/dev/null)"
  [ -f "$RESULTS/torch-$1.json" ] && say "  torch $1: $(python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print("MFU", r.get("mfu"), "; peak GPU memory", r.get("peak_gpu_mem_mb"), "MiB")' "$RESULTS/torch-$1.json" 2>/dev/null)"
done
# The explicit-backward tensor step with wick's kernels on both configs.
for cfg in small 124m; do
  timeout 240 env WICK_GPU_STEP=tensor WICK_GPU_KERNELS=1 "$WICK" bench train --device cuda --dtype bf16 --configs $cfg \
    --steps 20 --warmup 3 >"$RESULTS/bench-$cfg-tensor.json" 2>"$RESULTS/bench-$cfg-tensor.err"
  say "  $cfg, tensor step: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["step_path"], r["tokens_per_s"], "tokens/s; forward", r["forward_ms"], "backward", r["backward_ms"], "optimizer", r["optimizer_ms"], "ms; MFU", r["mfu"], "; peak GPU memory", r["peak_gpu_mem_mb"], "MiB")' "$RESULTS/bench-$cfg-tensor.json" 2>/dev/null || tail -2 "$RESULTS/bench-$cfg-tensor.err")"
done
# The data-parallel GPU path's own cost at world size 1: flattening + NCCL on 124m's gradients.
timeout 240 env WICK_NCCL=1 "$WICK" bench train --device cuda --dtype bf16 \
  --configs 124m --steps 20 --warmup 3 >"$RESULTS/bench-124m-nccl.json" 2>"$RESULTS/bench-124m-nccl.err"
say "  124m with gradients through NCCL (world size 1): $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["tokens_per_s"], "tokens/s; allreduce", r.get("allreduce_ms"), "ms a step")' "$RESULTS/bench-124m-nccl.json" 2>/dev/null || tail -2 "$RESULTS/bench-124m-nccl.err")"
# What wick's own kernels buy on the default (composed) 124m step.
timeout 240 env WICK_GPU_KERNELS=1 "$WICK" bench train --device cuda --dtype bf16 \
  --configs 124m --steps 20 --warmup 3 >"$RESULTS/bench-124m-kernels.json" 2>"$RESULTS/bench-124m-kernels.err"
say "  124m with wick's kernels (WICK_GPU_KERNELS=1): $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["tokens_per_s"], "tokens/s; forward", r["forward_ms"], "backward", r["backward_ms"], "optimizer", r["optimizer_ms"])' "$RESULTS/bench-124m-kernels.json" 2>/dev/null || tail -2 "$RESULTS/bench-124m-kernels.err")"

say "done: $([ $FAILED = 0 ] && echo all checks passed || echo some checks FAILED)"
exit $FAILED
