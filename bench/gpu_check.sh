#!/usr/bin/env bash
# The whole GPU check of the per-example gradient statistics (issue 17), in one script (< 5 min on an
# H100 / H200): editable install, the gpu-marked tests, the CUDA benchmark side by side (plain step,
# step + recorder, one-shot gradient_stats, vmap route), the training-loop benchmark (train() vs a bare
# loop, bench_train_loop.py) and a profile of the recorder step.
#
#   bash bench/gpu_check.sh            # from the repository root, on a machine with CUDA
#
# Everything is printed and, if $OUT is set (the device runner's output folder), also saved there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/geomprobe_gpu_check}"
mkdir -p "$OUT"
log() { echo "== $* ($(date -u +%H:%M:%S))"; }

log "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

log "editable install (no dependency resolution: the machine's torch stays)"
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2

log "gpu-marked tests (gradient statistics)"
status=0
timeout 120 python -m pytest -q -m gpu tests/test_trainers_gradstats.py > "$OUT/gpu_tests.txt" 2>&1 || status=$?
tail -5 "$OUT/gpu_tests.txt"   # the benchmarks still run when a test fails; the script exits with its status

log "benchmark: every model at batch 256 and 1024"
timeout 180 python bench/bench_gradstats.py --device cuda --models mlp,convnet3,alexnet,resnet18,transformer \
    --batch 256,1024 --repeats 5 --check 2>&1 | tee "$OUT/bench_gradstats_cuda.md"

log "benchmark: the transformer row of the issue (4 layers, d_model 256, sequence 128, batch 64)"
timeout 60 python bench/bench_gradstats.py --device cuda --models transformer --batch 64 --repeats 5 \
    2>&1 | tee "$OUT/bench_transformer_b64.md"

log "training loops: each experiment's train() vs a bare PyTorch loop (off / recorder every step), then bf16 autocast"
timeout 90 python bench/bench_train_loop.py --device cuda --steps 30 2>&1 | tee "$OUT/bench_train_loop_cuda.md"
timeout 60 python bench/bench_train_loop.py --device cuda --steps 30 --amp --experiments e1,e4 2>&1 \
    | tee "$OUT/bench_train_loop_cuda_amp.md"

log "profile of the recorder step (alexnet, batch 256): where the time goes"
timeout 60 python bench/bench_gradstats.py --device cuda --models alexnet --batch 256 --repeats 1 --skip-vmap \
    --profile alexnet 2>&1 | tee "$OUT/profile_alexnet.txt" | head -40
log "done (gpu tests exit status $status)"
exit "$status"
