#!/usr/bin/env bash
# The GPU proof of the CUDA Caffe bundle, for a machine with an NVIDIA GPU and its driver but without
# the runtime (no Debian 11 root filesystem, no Docker, no network, any Python): only this checkout, the
# bundle (make caffe-cuda) and the CUDA runtime libraries are needed.
#
#   tools/cuda/gpu-proof.sh [--cpu] [BUNDLE] [-- GPU_PROOF_OPTIONS]
#                 (BUNDLE default build/caffe-cuda-sm${CUDA_ARCH:-90}.tar.xz)
#
# It unpacks the bundle, finds the CUDA libraries (tools/cuda/use-bundle.sh: TSFCN_CUDA_LIBS, CUDA_HOME,
# /usr/local/cuda*, the nvidia-* pip wheels of any python3, ldconfig), checks the GPU with `caffe
# device_query` (one line and exit 1 when there is none), then runs tools/cuda/gpu_proof.py with the
# bundle's own Python 3.9: CPU vs GPU losses (20 iterations, no dropout), Python loss vs InfogainLoss on
# the GPU (100 TS-FCN iterations), `caffe time` at batch 1, the fast profile (its narrow start, then
# 1000 iterations) on phantoms it makes itself (wall time, Dice), the paper profile's expected hours.
# Written for <= 8 minutes on a current GPU (not yet run on one).
# --cpu: the CPU half, everything that needs no GPU, at smoke-test sizes (a couple of minutes on 2 cores).
# Results: $OUT (default runs/gpu-proof): gpu_proof.json (everything), gpu-proof.log, train-fast/.
# Settings: GPU (id, default 0), CUDA_ARCH (90), OUT, TSFCN_CUDA_LIBS (dirs with libcudart.so.13,
# libcublas.so.13, libcublasLt.so.13, libcurand.so.10 when they are not found by themselves: e.g.
# `bash tools/cuda/cuda-from-pypi.sh runtime DIR` on a machine with network, then copy DIR).
# Exit status: 0 when every check passed.
set -uo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
repo=$PWD
cpu=0
bundle=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) cpu=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage >&2; exit 2 ;;
        *) bundle=$1 ;;
    esac
    shift
done
out=${OUT:-runs/gpu-proof}
gpu=${GPU:-0}
arch=${CUDA_ARCH:-90}
bundle=${bundle:-build/caffe-cuda-sm$arch.tar.xz}
mkdir -p "$out" || exit 1
exec > >(tee "$out/gpu-proof.log") 2>&1
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 )) s] $*"; }

step "bundle $bundle"
dir=$(bash tools/cuda/use-bundle.sh unpack "$bundle" --dest "${TMPDIR:-/tmp}/ts-fcn-$(basename "$bundle" .tar.xz)") || exit 1
bash tools/cuda/use-bundle.sh cuda-libs --dir "$dir"
eval "$(bash tools/cuda/use-bundle.sh env --dir "$dir" --portable)"
# The bundle's Python, nothing of this machine's: its own modules plus the checkout (and no library
# preloaded for another Caffe, such as the runtime's parallel math).
export PYTHONPATH="$TSFCN_CUDA_PY:$repo/layers:$repo" PYTHONNOUSERSITE=1 MPLBACKEND=Agg GLOG_minloglevel=1 \
    PYTHONDONTWRITEBYTECODE=1
unset LD_PRELOAD
python3 -c 'import sys; assert sys.executable.startswith(sys.argv[1]), sys.executable' "$dir" ||
    { echo "gpu-proof: python3 is not the bundle's"; exit 1; }

if [ "$cpu" = 1 ]; then
    step "CPU half: every step on the CPU at smoke-test sizes"
    exec python3 -m tools.cuda.gpu_proof --cpu --out "$out" "$@"
fi
step "GPU $gpu"
bash tools/cuda/use-bundle.sh check --dir "$dir" --gpu "$gpu" || exit 1
step "the proof (tools/cuda/gpu_proof.py) on GPU $gpu"
timeout 900 python3 -m tools.cuda.gpu_proof --gpu "$gpu" --out "$out" "$@"
status=$?
step "done (status $status) in $(( $(date +%s) - t0 )) s; results in $out/gpu_proof.json"
exit $status
