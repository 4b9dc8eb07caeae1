#!/usr/bin/env bash
# Packs a finished CUDA Caffe build into the relocatable bundle caffe-cuda-<tag>.tar.xz.
#
#   pack-bundle.sh SRC BUNDLE TAG [EXTRA_LIB_ROOT [PY_WHEEL_DIR]]
#
# Runs in the Debian 11 system that built SRC (build-caffe-cuda.sh calls it). The bundle holds, under
# caffe-cuda-<tag>/:
#   bin/caffe                     the caffe tool
#   python/caffe/                 pycaffe (_caffe.so, caffe_pb2.py, the .py files)
#   lib/                          libcaffe and every non-CUDA library it needs from bullseye (not glibc)
#   lib/python3.9/, py/python3    a portable Python 3.9 (stdlib) for machines without the runtime
#   lib/python3/dist-packages/    what the toolkit's GPU proof (tools/cuda/gpu-proof.sh) imports, for that
#                                 Python: numpy, google.protobuf, six, h5py, tqdm, scipy (the phantoms)
#                                 from bullseye, and PY_WHEELS (pydicom: `make data` reads the phantoms'
#                                 DICOM) from PY_WHEEL_DIR, pinned as in tools/runtime/requirements.txt
#   BUNDLE.json                   architectures, CUDA version, the CUDA sonames the GPU machine must provide
# RPATHs are $ORIGIN-relative, so the folder can live anywhere. The CUDA libraries (cudart, cuBLAS,
# cuRAND, the driver) are NOT inside: they come from the GPU machine (tools/cuda/use-bundle.sh finds them).
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
src=$1 bundle=$2 tag=$3 extra=${4:-} py_wheel_dir=${5:-}
# Pure-Python packages taken from PyPI wheels (build-caffe-cuda.sh fetches them at the runtime's pins).
PY_WHEELS="pydicom"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "[caffe-cuda] $*" >&2; }

name=caffe-cuda-$tag
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
b=$tmp/$name
mkdir -p "$b/bin" "$b/lib" "$b/python" "$b/py" "$b/lib/python3/dist-packages"

# Caffe itself.
cp -L "$src/_build/tools/caffe" "$b/bin/caffe"
cp -a "$src"/_build/lib/libcaffe.so* "$b/lib/"
cp -rL "$src/python/caffe" "$b/python/caffe"
rm -rf "$b/python/caffe/test" "$b/python/caffe/imagenet"
find "$b/python" -name __pycache__ -prune -exec rm -rf {} +
[ -f "$b/python/caffe/_caffe.so" ] && [ -f "$b/python/caffe/proto/caffe_pb2.py" ] ||
    { log "pycaffe is incomplete in $src/python/caffe"; exit 1; }

# The portable Python 3.9: interpreter, stdlib (less tests, IDLE, Tk), numpy, protobuf, six, h5py.
cp -L /usr/bin/python3.9 "$b/py/python3.9"
ln -s python3.9 "$b/py/python3"
tar -C /usr/lib -cf - --exclude=__pycache__ --exclude=python3.9/test --exclude=python3.9/idlelib \
    --exclude=python3.9/tkinter --exclude=python3.9/turtledemo --exclude=python3.9/ensurepip \
    --exclude=python3.9/lib2to3 --exclude=python3.9/config-3.9-x86_64-linux-gnu \
    --exclude=python3.9/unittest/test --exclude=python3.9/distutils/tests python3.9 | tar -C "$b/lib" -xf -
dist=$b/lib/python3/dist-packages
for m in numpy google six.py h5py tqdm scipy; do
    [ -e "/usr/lib/python3/dist-packages/$m" ] || { log "missing python module $m"; exit 1; }
    cp -rL "/usr/lib/python3/dist-packages/$m" "$dist/"
done
for m in $PY_WHEELS; do
    w=$(ls "$py_wheel_dir/$m"-*.whl 2>/dev/null | head -1)
    [ -n "$w" ] || { log "no $m wheel in '${py_wheel_dir}'"; exit 1; }
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$dist"
done
rm -rf "$dist"/*.dist-info "$dist/pydicom/data/test_files" "$dist/pydicom/tests"
find "$b/lib" -name __pycache__ -prune -exec rm -rf {} +
# Tests and docs; scipy's subpackages that nothing here imports (the phantoms use scipy.ndimage, which
# needs linalg, special, sparse and _lib: 22 of scipy's 60 MB).
# (Debian's h5py imports its tests package.)
find "$dist" -depth -type d \( -name tests -o -name doc \) -not -path "$dist/h5py/*" -exec rm -rf {} +
for sub in "$dist"/scipy/*/; do
    case "$(basename "$sub")" in _lib|linalg|ndimage|sparse|special|_build_utils) ;; *) rm -rf "$sub" ;; esac
done

# Every ELF's libraries, resolved in this system, minus glibc's own and CUDA's.
skip='^(ld-linux.*|libc|libm|libdl|libpthread|librt|libresolv|libutil|libnsl|libanl|libcuda|libcudart|libcublas|libcublasLt|libcurand|libnvidia-.*)\.so'
export LD_LIBRARY_PATH="$b/lib${extra:+:$extra/lib}"
mapfile -t elves < <(find "$b" -type f \( -name '*.so*' -o -path '*/bin/caffe' -o -path '*/py/python3.9' \) \
    -exec sh -c 'file -b "$1" | grep -q "^ELF" && echo "$1"' sh {} \;)
ldd "${elves[@]}" 2>/dev/null | awk '/=> \// { print $1, $3 }' | sort -u | while read -r soname path; do
    [[ "$soname" =~ $skip ]] && continue
    [ -e "$b/lib/$soname" ] || cp -L "$path" "$b/lib/$soname"
done
if ldd "${elves[@]}" 2>/dev/null | grep 'not found' | grep -vE 'libcu(da|dart|blas|blasLt|rand)\.so'; then
    log "unresolved libraries above"; exit 1
fi
# A second pass: the libraries that the copied libraries need.
ldd "$b"/lib/*.so* 2>/dev/null | awk '/=> \// { print $1, $3 }' | sort -u | while read -r soname path; do
    [[ "$soname" =~ $skip ]] && continue
    [ -e "$b/lib/$soname" ] || cp -L "$path" "$b/lib/$soname"
done

# $ORIGIN-relative search paths.
patchelf --set-rpath '$ORIGIN/../lib' "$b/bin/caffe"
# RUNPATH is not inherited: every library looks beside itself (libhdf5 -> libsz, ...).
for f in "$b"/lib/*.so*; do
    case "$(basename "$f")" in libstdc++.so.*|libgcc_s.so.*) continue ;; esac   # need glibc only (patchelf 0.12 crashes on them)
    [ -L "$f" ] || patchelf --set-rpath '$ORIGIN' "$f" 2>/dev/null || log "patchelf left $(basename "$f") as it was"
done
patchelf --set-rpath '$ORIGIN/../../lib' "$b/python/caffe/_caffe.so"
strip --strip-unneeded "$b/bin/caffe" "$b"/lib/libcaffe.so.*.* "$b/python/caffe/_caffe.so" 2>/dev/null || true

cuda_version=$(/usr/local/cuda/bin/nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\),.*/\1/p' ||
    "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
needs=$(readelf -d "$b"/lib/libcaffe.so.*.* | sed -n 's/.*Shared library: \[\(lib\(cudart\|cublas\|cublasLt\|curand\)\.so[^]]*\)\].*/\1/p' | sort -u)
# cuBLAS loads cuBLASLt (same major version): the GPU machine must have both.
needs="$needs $(echo "$needs" | sed -n 's/^libcublas\.so\./libcublasLt.so./p')"
python3 - "$b/BUNDLE.json" "$tag" "$cuda_version" "$(cd "$src" && ls "$here"/patches/*.patch | xargs -n1 basename | tr '\n' ' ')" $needs <<'EOF'
import json, sys, datetime
path, tag, cuda, patches, *needs = sys.argv[1:]
json.dump({"caffe": "BVLC Caffe 1.0, Debian 11 source package caffe 1.0.0+git20180821.99bd997",
           "architectures": tag[2:].split("_"), "cuda_built_with": cuda, "cudnn": False,
           "patches": patches.split(), "cuda_sonames_needed": needs + ["libcuda.so.1"],
           "python": "3.9 (portable, py/python3)", "built": datetime.date.today().isoformat()},
          open(path, "w"), indent=2)
EOF
cp "$here/use-bundle.sh" "$b/use-bundle.sh"

mkdir -p "$(dirname "$bundle")"
log "packing $bundle"
XZ_OPT=-6T0 tar -C "$tmp" --owner=0 --group=0 -cJf "$bundle.partial" "$name"
mv "$bundle.partial" "$bundle"
log "bundle $(du -h "$bundle" | cut -f1) (unpacked $(du -sh "$b" | cut -f1))"
