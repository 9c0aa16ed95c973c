#!/usr/bin/env bash
# The GPU checks of issue 23 in one run of about eight minutes on one GPU: the first thing to run on a lent GPU machine.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh          # from the checkout's root; OUT defaults to ./gpu-check
#
# 1. benchmarks/gpu_throughput.py at reduced counts (ConvNeXt-L with random weights, short edges 1024 and 800,
#    fp32 / tf32 / bf16, batches 1 and 4, eager, `fcclip label` in bf16 on 16 and 32 images): gpu_throughput.md and
#    .json (written as it goes: a run cut short keeps its figures); then compiled, bf16, batch 4: gpu_compiled.md.
# 2. The CUDA tests (pytest -m gpu: post-processing on CUDA, mixed precision under CUDA autocast, bf16 against fp32
#    PQ of a tiny model trained with mixed precision, a CPU checkpoint resumed on the GPU and back, TF32) and the
#    precision tests: pytest.log.
# 3. `fcclip train` resumed across devices: 5 iterations on the CPU, resumed on the GPU with mixed precision (a
#    checkpoint without grad-scaler state) to 10, and back on the CPU to 15: train_resume.log.
#
# Needs no network and no weights. Python packages: torch with CUDA, and the project's dependencies (pyproject.toml:
# numpy, pillow, pyyaml, open_clip_torch, timm, ftfy, regex, huggingface_hub, safetensors, scipy, pycocotools,
# pyarrow, fsspec, ray[data,train], tensorboardX optional) plus pytest. The checkout is used from where it is
# (PYTHONPATH; pipelines/ through a link named fcclip_pipelines): nothing is installed.
# Exit status: 0 when every step passed. Everything it prints is also in $OUT/gpu_check.log.
# LABEL_IMAGES=0 leaves out the `fcclip label` rows of step 1 (for a machine without DuckDB and deltalake); STEPS=13 runs steps 1 and 3 only; GPUS=0 resumes step 3 on the CPU instead of the GPU (a dry run of the script on a
# machine without one).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
STEPS=${STEPS:-123}
GPUS=${GPUS:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S) UTC)"; }
# this checkout's `fcclip` command, as pyproject.toml names its console script
FCCLIP=("$PY" -c "import importlib, sys, tomllib
module, func = tomllib.load(open('pyproject.toml', 'rb'))['project']['scripts']['fcclip'].split(':')
sys.exit(getattr(importlib.import_module(module), func)())")

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
# the checkout's packages under their installed names (pyproject.toml's package-dir: pipelines/ is fcclip_pipelines),
# installing nothing: a folder of links on PYTHONPATH
shim=$(mktemp -d)
"$PY" - "$shim" <<'EOF' || status=1
import os, sys, tomllib
for name, folder in tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"].items():
    if "." not in name and name != folder and not os.path.exists(os.path.join(sys.argv[1], name)):
        os.symlink(os.path.abspath(folder), os.path.join(sys.argv[1], name))
EOF
export PYTHONPATH="$PYTHONPATH:$shim"
"$PY" - <<'EOF' || status=1
import sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("device:", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0),
      "| bf16 (torch, counting emulation):", torch.cuda.is_bf16_supported())
from fcclip.precision import resolve_autocast_dtype
print("fcclip: bf16 autocast on this GPU:", resolve_autocast_dtype(torch.bfloat16, "cuda"))
EOF
grep -m1 -o 'model name.*' /proc/cpuinfo || true

if [[ $STEPS == *1* ]]; then
step "1. benchmarks/gpu_throughput.py (reduced)"
timeout 200 "$PY" benchmarks/gpu_throughput.py --size 1024,800 --batches 1,4 --iters 3 --warmup 1 --compile off \
    --label-images "${LABEL_IMAGES:-16}" --label-dtypes bf16 --budget-s 150 --json "$OUT/gpu_throughput.json" \
    > "$OUT/gpu_throughput.md"
rc=$?
# a run cut short prints nothing: its tables from the JSON, which keeps every configuration it finished
[ $rc -eq 0 ] || "$PY" benchmarks/gpu_throughput.py --report "$OUT/gpu_throughput.json" > "$OUT/gpu_throughput.md"
cat "$OUT/gpu_throughput.md"
[ $rc -eq 0 ] || { echo "gpu_throughput.py: exit $rc (124: cut by the timeout)"; status=1; }
# torch.compile, one configuration under a limit of its own: compiling ConvNeXt-L and the decoders took longer than
# the 90 s a shared budget had left (H200, torch 2.11, 2026-12-04), and the budget is checked between configurations
step "1b. benchmarks/gpu_throughput.py, compiled (bf16, batch 4)"
timeout 240 "$PY" benchmarks/gpu_throughput.py --size 1024 --batches 4 --dtypes bf16 --iters 3 --warmup 1 \
    --compile on --label-images 0 --json "$OUT/gpu_compiled.json" > "$OUT/gpu_compiled.md"
rc=$?
[ $rc -eq 0 ] || "$PY" benchmarks/gpu_throughput.py --report "$OUT/gpu_compiled.json" > "$OUT/gpu_compiled.md" 2>&1
cat "$OUT/gpu_compiled.md"
[ $rc -eq 0 ] || { echo "gpu_throughput.py --compile on: exit $rc (124: cut by the timeout)"; status=1; }
fi

if [[ $STEPS == *2* ]]; then
step "2. CUDA tests and precision tests"
timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors -m gpu tests/ 2>&1 | tee "$OUT/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 60 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_precision.py tests/test_mixed_precision.py \
    2>&1 | tee -a "$OUT/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [[ $STEPS == *3* ]]; then
step "3. fcclip train: CPU -> GPU (mixed precision) -> CPU"
work=$(mktemp -d)
"$PY" -c "from fcclip.datasets.synthetic_panoptic import write_coco_panoptic as w; w('$work/coco', 16, seed=0, size=(128, 160))"
cat > "$work/run.yaml" <<'EOF'
name: resume-check
model: fcclip-tiny
weights: random
data: {image_size: 128, min_scale: 0.8, max_scale: 1.2, loader_workers: 0}
solver: {batch_size: 4, lr: 0.001, max_iters: 15, steps: [12], warmup_iters: 2, clip_grad: 1.0, amp: true}
loss: {num_points: 1024}
checkpoint_every: 5
eval_every: 0
log_every: 5
EOF
train() {
    timeout 100 "${FCCLIP[@]}" train --config "$work/run.yaml" --data "$work/coco" --storage "$work/runs" "$@"
    local rc=$?
    echo "fcclip train $*: exit $rc$([ $rc -eq 124 ] && echo ' (timed out)')"
    return $rc
}
{
    train --gpus-per-worker 0 --max-iters 5 &&
    train --resume --gpus-per-worker "$GPUS" --max-iters 10 &&
    train --resume --gpus-per-worker 0 --max-iters 15 &&
    "$PY" - "$work/runs/resume-check" <<'EOF'
import glob, sys, torch
states = sorted(glob.glob(sys.argv[1] + "/checkpoint_*/state.pt"))
last = torch.load(states[-1], map_location="cpu", weights_only=True)
print("last checkpoint:", states[-1], "iteration", last["iteration"], "| ranks with random states:", len(last["rng"]))
assert last["iteration"] == 15
EOF
} 2>&1 | tee "$OUT/train_resume.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
rm -rf "$work"
fi
rm -rf "$shim"

step "done: status $status"
exit $status
