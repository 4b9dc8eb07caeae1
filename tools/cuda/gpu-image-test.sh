#!/usr/bin/env bash
# What the GPU image (Dockerfile.gpu) must do on a machine without a GPU; `make docker-test-gpu` runs it
# inside the image (tools/runtime/podman-test.sh --gpu).
#
#   bash tools/cuda/gpu-image-test.sh        (in the image; exit status 0 when every check passed)
#
#  1. `import caffe` loads the CUDA build of the bundle (tools.caffe_net.cuda_build()), and the CUDA
#     runtime libraries it needs are the image's own (from the pinned PyPI wheels);
#  2. without a GPU, `use-bundle.sh check` (caffe device_query) fails with exit status 1 and one clear
#     line, not glog's stack trace;
#  3. CPU-mode training of the full TS-FCN (fc6/fc7 at the report's width) with the Python loss, against
#     InfogainLoss (tools/cuda/gpu_proof.py's check), and the GPU proof's CPU half (phantoms -> make data
#     -> fast-profile training -> caffe time) with the image's Python.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
fail=0
check() { echo "[gpu-image-test] $1: $2"; [ "$2" = ok ] || fail=1; }

echo "[gpu-image-test] 1. import caffe"
python3 - <<'EOF' && check "import caffe loads the CUDA build" ok || check "import caffe loads the CUDA build" FAILED
import caffe
from tools import caffe_net
assert caffe.__file__.startswith("/opt/ts-fcn-cuda/"), caffe.__file__
assert caffe_net.cuda_build(), "pycaffe is not linked against libcudart"
print("pycaffe", caffe.__file__)
EOF
missing=$(bash tools/cuda/use-bundle.sh cuda-libs | grep -v '^libcuda\.so\.1 ' | grep 'NOT FOUND')
[ -z "$missing" ] && check "CUDA runtime libraries in the image" ok || check "CUDA runtime libraries: $missing" FAILED
bash tools/cuda/use-bundle.sh cuda-libs

echo "[gpu-image-test] 2. caffe device_query without a GPU"
out=$(bash tools/cuda/use-bundle.sh check 2>&1)
rc=$?
echo "$out"
if [ "$rc" = 1 ] && grep -q "GPU 0 is not usable: caffe device_query failed" <<<"$out" &&
        ! grep -q "stack trace" <<<"$out" && [ "$(grep -c 'error:' <<<"$out")" = 1 ]; then
    check "no GPU: one line and exit status 1" ok
else
    check "no GPU: expected one error line and exit status 1, got exit status $rc" FAILED
fi

echo "[gpu-image-test] 3. CPU-mode training (full TS-FCN, Python loss vs InfogainLoss; the proof's CPU half)"
python3 - <<'EOF' && check "full TS-FCN, 2 CPU iterations per loss" ok || check "full TS-FCN CPU training" FAILED
import tempfile
from tools.cuda import gpu_proof
with tempfile.TemporaryDirectory() as tmp:
    r = gpu_proof.check_loss_layers(tmp, None, 2)
print("losses", r["curves"], "max rel diff %.2e" % r["max_rel_diff"])
assert r["passed"] and all(v > 0 for v in r["curves"]["python"]), r
EOF
out_dir=$(mktemp -d)
python3 -m tools.cuda.gpu_proof --cpu --out "$out_dir" && check "GPU proof, CPU half" ok || check "GPU proof, CPU half" FAILED
rm -rf "$out_dir"

[ "$fail" = 0 ] && echo "[gpu-image-test] PASSED" || echo "[gpu-image-test] FAILED"
exit $fail
