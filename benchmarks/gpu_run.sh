#!/usr/bin/env bash
# `make bench-gpu`: the GPU benchmarks on a machine with one NVIDIA GPU, PyTorch and no network, in under 8 minutes.
#
#   bash benchmarks/gpu_run.sh [--cpu] [--smoke] [--skip PHASE[,PHASE]] [--deadline SECONDS]
#
# What the machine must have: Python 3 with torch (CUDA), torchvision, timm, onnx, onnxruntime (a CPU build is
# enough), numpy, pillow. What it may lack, brought along in the working tree:
#   .whl/                     wheels of pydantic, bentoml and their missing dependencies
#                             (made here with `bash benchmarks/gpu/fetch_wheels.sh`; installed into /tmp/site)
#   benchmarks/gpu/corpus/    real JPEG/PNG test images (made here with `python -m benchmarks.gpu.prepare_corpus`)
# Phases, each logged, each capped with `timeout`, none stopping the others when it fails:
#   env       versions, GPU, CPU cores
#   wheels    pip install --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site:$PWD
#   corpus    check (or make, if scikit-learn/scikit-image are there) the image corpus
#   build     ResNet-50 224 px, 1000 classes, random weights: joint and folded (tau_norm) packages, exported ON
#             this machine by ltserve's exporter (onnxscript from .whl/; model.pt2 with the local torch)
#   preprocess python -m benchmarks.gpu_preprocess_check: device-side preprocessing (nvJPEG decode, resize, crop,
#             normalisation in the CUDA graph) against the CPU path on the corpus: top-1 agreement, many/medium/few
#   latency   python -m benchmarks.model_latency --device cuda (torch backend fp32/fp16, +/- CUDA graphs; ONNX
#             Runtime CUDA/TensorRT when installed; ONNX Runtime CPU up to batch 8 for reference)
#   serve     python -m benchmarks.serve_load on the ResNet-50 package with the torch backend (LTSERVE_BACKEND=torch)
#   summary   the goals, from the results files
# Results: $OUT if set, else benchmarks/results/<card>/ : <benchmark>/results.{json,md,png} and gpu_run.log.
#   --cpu      run everything on CPU (no GPU needed): checks the script here
#   --smoke    tiny sizes (a ResNet-10 at 32 px, short phases): seconds, not minutes
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
START=$(date +%s)
DEVICE=cuda
SMOKE=0
SKIP=","
DEADLINE=${LTSERVE_GPU_DEADLINE_S:-460}  # the whole script; the machine's slot is 8 minutes
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) DEVICE=cpu ;;
    --smoke) SMOKE=1 ;;
    --skip) SKIP=",$2,"; shift ;;
    --deadline) DEADLINE=$2; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
export PY DEVICE SMOKE REPO
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

card() {
  if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1
  fi
}
CARD=$(card)
SLUG=$(echo "${CARD:-cpu-$(uname -m)-$(nproc)c}" | tr 'A-Z' 'a-z' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
[ "$SMOKE" = 1 ] && SLUG="$SLUG-smoke"
OUTDIR=${OUT:-$REPO/benchmarks/results/$SLUG}
WORK=${LTSERVE_GPU_WORK:-${TMPDIR:-/tmp}/ltserve-gpu-run}
mkdir -p "$OUTDIR" "$WORK"
LOG=$OUTDIR/gpu_run.log
: >"$LOG"

log() { echo "[$(date +%H:%M:%S) +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# phase NAME LIMIT_S CMD...: run CMD with its output in the log, capped by LIMIT_S and by what the deadline leaves
phase() {
  local name=$1 limit=$2 left rc t0
  shift 2
  if [[ "$SKIP" == *",$name,"* ]]; then log "== $name: skipped (--skip)"; return 0; fi
  left=$((DEADLINE - ($(date +%s) - START) - 15))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then log "== $name: skipped, only ${left}s left before the deadline"; return 0; fi
  log "== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then  # a shell function: `timeout` runs it in a child bash (export -f)
    export -f "$1"
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  fi
  rc=$?
  if [ $rc -eq 0 ]; then log "-- $name: ok in $(($(date +%s) - t0))s"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then log "-- $name: TIMED OUT after ${limit}s"
  else log "-- $name: FAILED (exit $rc) after $(($(date +%s) - t0))s"; fi
  return 0
}

# copy a benchmark's results.{json,md,png} from the work folder into the results folder
collect() {
  local name=$1
  mkdir -p "$OUTDIR/$name"
  for f in results.json results.md results.png; do
    [ -f "$WORK/results/$name/$f" ] && cp "$WORK/results/$name/$f" "$OUTDIR/$name/"
  done
  ls "$OUTDIR/$name" 2>/dev/null | grep -q results.json || { rmdir "$OUTDIR/$name" 2>/dev/null; log "$name: no results"; }
}

log "ltserve GPU run: device $DEVICE, card '${CARD:-none}', results in $OUTDIR, work in $WORK, deadline ${DEADLINE}s"

env_info() {
  echo "python: $($PY -c 'import sys; print(sys.version.split()[0], sys.executable)')"
  echo "cores: $(nproc)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY - <<'EOF'
import importlib
for name in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript", "numpy", "PIL", "pydantic",
             "bentoml", "sklearn", "skimage"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
import torch
print("cuda available:", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import onnxruntime as ort
    print("onnxruntime providers:", ort.get_available_providers())
except Exception:
    pass
EOF
}
phase env 60 env_info

install_wheels() {
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no .whl/ folder: using the installed packages only (make it with benchmarks/gpu/fetch_wheels.sh)"
    return 0
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}
phase wheels 120 install_wheels
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PYTHONPATH" PATH="/tmp/site/bin:$PATH"  # bentoml's script too
check_imports() {  # what the benchmarks and `bentoml serve` import: a missing wheel shows here, not in a server log
  $PY - <<'PYEOF'
import importlib
failed = []
for name in ("pydantic", "onnxscript", "ltserve.package", "ltserve.runtime.torch_runner", "ltserve.runtime", "bentoml",
             "_bentoml_impl.server.app", "opentelemetry.instrumentation.asgi", "opentelemetry.sdk",
             "opentelemetry.instrumentation.aiohttp_client", "uvicorn", "starlette", "multipart", "zmq", "tornado",
             "watchfiles", "httpx_ws", "a2wsgi", "simple_di", "cattrs", "schema", "asgiref", "pythonjsonlogger",
             "aiosqlite"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(name)
        print(f"import {name}: {type(exc).__name__}: {exc}")
print("imports ok" if not failed else f"missing: {', '.join(failed)} (add wheels in benchmarks/gpu/fetch_wheels.sh)")
raise SystemExit(1 if failed else 0)
PYEOF
}
phase imports 60 check_imports

CORPUS=${LTSERVE_CORPUS:-$REPO/benchmarks/gpu/corpus}
export CORPUS WORK
check_corpus() {
  if [ ! -f "$CORPUS/manifest.json" ]; then
    echo "no corpus at $CORPUS: making one here"
    $PY -m benchmarks.gpu.prepare_corpus --out "$CORPUS" --n 24 || return 1
  fi
  echo "corpus: $(find "$CORPUS" -type f | wc -l) files, $(du -sh "$CORPUS" | cut -f1)"
}
phase corpus 60 check_corpus

if [ "$SMOKE" = 1 ]; then
  SIZE=(--arch resnet10 --size 32 --classes 10); BATCHES=1,4; SECONDS_CELL=0.2; CONC=1,4; DUR=1
else
  # batch 1 and 256 first: the goals are there, should the time budget run out
  SIZE=(--arch resnet50 --size 224 --classes 1000); BATCHES=1,256,8,32,128; SECONDS_CELL=1; CONC=1,16,64; DUR=5
fi
[ "$DEVICE" = cpu ] && [ "$SMOKE" = 0 ] && BATCHES=1,8,32
VARIANTS=fp32,fp32-graphs,fp16,fp16-graphs
export CONC DUR
ML=($PY -m benchmarks.model_latency --device "$DEVICE" --work "$WORK/build" --no-demo "${SIZE[@]}")

phase build 180 "${ML[@]}" --build-only
# device-side preprocessing vs the CPU path (issue 12): about a minute, before latency so that it always runs
preprocess_check() {
  local pkg
  pkg=$(ls -d "$WORK"/build/models/*-joint 2>/dev/null | head -1)
  $PY -m benchmarks.gpu_preprocess_check --device "$DEVICE" --corpus "$CORPUS" ${pkg:+--photo-model "$pkg"} \
    --out "$WORK/results/gpu_preprocess_check" $([ "$SMOKE" = 1 ] && echo --smoke)
}
phase preprocess 75 preprocess_check
collect gpu_preprocess_check

phase latency 200 "${ML[@]}" --batches "$BATCHES" --seconds "$SECONDS_CELL" --cpu-max-batch 8 \
  --gpu-variants "$VARIANTS" --time-budget 140 --out "$WORK/results/model_latency"
collect model_latency

serve() {
  local pkg
  pkg=$(ls -d "$WORK"/build/models/*-joint 2>/dev/null | head -1)
  if [ -z "$pkg" ]; then echo "no package built: nothing to serve"; return 1; fi
  # serve_load names its log files after --models: give it a bare name (a link in the repo root, removed after)
  local name
  name=$(basename "$pkg")
  ln -sfn "$pkg" "$REPO/$name" || return 1
  trap 'rm -f "$REPO/$name"' RETURN
  local help args=()
  help=$($PY -m benchmarks.serve_load --help 2>&1) || { echo "$help"; return 1; }
  grep -q -- "--backend" <<<"$help" && args+=(--backend torch)
  grep -q -- "--corpus" <<<"$help" && args+=(--corpus "$CORPUS")
  # the service reads LTSERVE_BACKEND (torch backend: CUDA fp16, CUDA graphs per batch bucket)
  LTSERVE_BACKEND=torch LTSERVE_TORCH_PRECISION=fp16 $PY -m benchmarks.serve_load --device "$DEVICE" \
    --models "$name" --concurrency "$CONC" --duration "$DUR" --out "$WORK/results/serve_load" "${args[@]}"
}
phase serve 200 serve
collect serve_load

phase summary 30 $PY -m benchmarks.perf_readme --summary "$OUTDIR"
log "done in $(($(date +%s) - START))s; results in $OUTDIR"
ls -la "$OUTDIR" "$OUTDIR"/* >>"$LOG" 2>&1
exit 0
