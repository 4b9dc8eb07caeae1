#!/usr/bin/env bash
# The GPU proof (issue 7 part 4), for a machine with an NVIDIA GPU and its driver but without the
# runtime (no Docker, no internet, any Python): only this checkout and the CUDA Caffe bundle are needed.
#
#   tools/cuda/gpu-proof.sh [BUNDLE]      (default build/caffe-cuda-sm${CUDA_ARCH:-90}.tar.xz)
#
#   (a)+(b) tools/cuda/gpu_proof.py: CPU vs GPU losses on a net without dropout, then TS-FCN on the GPU
#           with the Python loss vs InfogainLoss from the same seed;
#   (c)     tools/bench's net stages on the GPU (train and forward timings: the ms per iteration),
#           `caffe time` of the TS-FCN train net, and, where PROOF_DATA names a DATA folder made by
#           `make data` (e.g. a small phantom cohort), a fast-profile training of fold 0 on the GPU.
# Everything goes to $OUT (default runs/gpu-proof): gpu-proof.log, gpu.csv, device_query.txt,
# cuda-libs.txt, gpu_proof.json, bench.json, caffe-time.txt, train-fast/. Exit status: 0 when (a), (b)
# and the benchmark passed.
# Settings: GPU (id, default 0), CUDA_ARCH (90), TSFCN_CUDA_LIBS (dirs with the CUDA 13 libraries, when
# they are not found by themselves; see tools/cuda/use-bundle.sh), PROOF_DATA, PROOF_ITERS (50).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
repo=$PWD
out=${OUT:-runs/gpu-proof}
gpu=${GPU:-0}
arch=${CUDA_ARCH:-90}
bundle=${1:-build/caffe-cuda-sm$arch.tar.xz}
mkdir -p "$out"
exec > >(tee "$out/gpu-proof.log") 2>&1
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 )) s] $*"; }
status=0

step "bundle $bundle"
dir=$(bash tools/cuda/use-bundle.sh unpack "$bundle" --dest "${TMPDIR:-/tmp}/ts-fcn-caffe-cuda-sm$arch") || exit 1
bash tools/cuda/use-bundle.sh cuda-libs --dir "$dir" | tee "$out/cuda-libs.txt"
eval "$(bash tools/cuda/use-bundle.sh env --dir "$dir" --portable)"
export PYTHONPATH="$PYTHONPATH:$repo/layers:$repo" MPLBACKEND=Agg GLOG_minloglevel=1 PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.csv" || true
caffe device_query -gpu "$gpu" >"$out/device_query.txt" 2>&1 || { cat "$out/device_query.txt"; exit 1; }
grep -E "Name|Major|Minor" "$out/device_query.txt"

step "(a) CPU vs GPU, (b) Python loss vs InfogainLoss on the GPU"
timeout 600 python3 -m tools.cuda.gpu_proof --gpu "$gpu" --iters "${PROOF_ITERS:-50}" --out "$out" || status=1

step "(c) benchmark: tools.bench net stages on GPU $gpu"
timeout 600 python3 -m tools.bench --gpu "$gpu" --only machine,flops,train,forward --out "$out/bench.json" || status=1

step "(c) caffe time: TS-FCN train net (batch 1, Python loss), 200 iterations"
tmp=$(mktemp -d)
python3 - "$tmp" <<'EOF' && (cd "$tmp" && timeout 300 caffe time -model train.prototxt -gpu "$gpu" -iterations 200) >"$out/caffe-time.txt" 2>&1 || status=1
import os, sys
from tools.cuda import gpu_proof
from prototxt import net
src = gpu_proof.synthetic_h5(sys.argv[1], 8, 100, scale=10.0)
net.write(os.path.join(sys.argv[1], "train.prototxt"), split="train", train_source=src)
EOF
grep -E "Average (Forward|Backward|Forward-Backward)" "$out/caffe-time.txt" || tail -5 "$out/caffe-time.txt"
rm -rf "$tmp"

if [ -n "${PROOF_DATA:-}" ] && [ -f "$PROOF_DATA/manifest.json" ]; then
    step "(c) fast-profile training of fold 0 on GPU $gpu (DATA $PROOF_DATA)"
    s=$SECONDS
    timeout 900 python3 -m tools.train --fold 0 --data "$PROOF_DATA" --run "$out/train-fast" \
        --profile fast --gpu "$gpu" --restart || status=1
    echo "fast-profile training: $((SECONDS - s)) s wall" | tee "$out/train-fast.time"
else
    step "(c) fast-profile training skipped: set PROOF_DATA to a DATA folder (make phantoms N=5 && make data)"
fi

step "done (status $status); results in $out"
exit $status
