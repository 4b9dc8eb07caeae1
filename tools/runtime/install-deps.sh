#!/bin/sh
# Installs BVLC Caffe 1.0 and every Python dependency of the toolkit into a Debian 11 (bullseye) system.
#
# The one install script of the project: `make env` runs it inside the debootstrapped root filesystem
# (tools/runtime/runtime.sh), the Dockerfile runs it in `debian:bullseye-slim`. Debian packages first;
# pip only for what bullseye lacks (tools/runtime/requirements.txt), with numpy held at Debian's build so
# pycaffe's compiled module keeps matching it.
#
# Environment: PIP_CERT (optional) a CA bundle for pip behind a TLS-intercepting proxy.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive

apt-get update -q
# caffe + python3-caffe: BVLC Caffe 1.0 (CPU) with Python layers; libopenblas0-pthread replaces the
# reference BLAS through update-alternatives; g++ builds the parallel math library below. The rest: the
# toolkit's Python dependencies.
apt-get install -y -q --no-install-recommends \
    caffe python3-caffe libopenblas0-pthread \
    python3-numpy python3-scipy python3-h5py python3-matplotlib python3-pil \
    python3-nibabel python3-tqdm python3-pytest python3-yaml \
    python3-pip python3-setuptools python3-wheel \
    make ca-certificates procps g++
apt-get clean
rm -rf /var/lib/apt/lists/*

numpy_version=$(python3 -c 'import numpy; print(numpy.__version__)')
echo "numpy==$numpy_version" > /tmp/ts-fcn-constraints.txt
python3 -m pip install --no-cache-dir --disable-pip-version-check -q \
    -c /tmp/ts-fcn-constraints.txt -r "$here/requirements.txt"
rm -f /tmp/ts-fcn-constraints.txt

# Caffe's element-wise math on every core (tools/runtime/caffe_parallel_math.cpp); whether it is used is
# decided by tools/runtime/parallel_math.py's self-check.
mkdir -p /usr/local/lib/ts-fcn
g++ -O2 -fPIC -shared -fopenmp -o /usr/local/lib/ts-fcn/libcaffe_parallel_math.so.tmp \
    "$here/caffe_parallel_math.cpp" -l:libblas.so.3
mv /usr/local/lib/ts-fcn/libcaffe_parallel_math.so.tmp /usr/local/lib/ts-fcn/libcaffe_parallel_math.so

python3 -c 'import caffe, numpy, h5py, pydicom, highdicom, nibabel, nrrd; print("caffe", caffe.__version__)'
