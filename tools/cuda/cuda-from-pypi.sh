#!/usr/bin/env bash
# The one CUDA release of the toolkit's GPU build, from NVIDIA's PyPI wheels: the only place its
# versions are written down (Dockerfile.gpu, build-caffe-cuda.sh, the README and .ci/run use this).
#
#   cuda-from-pypi.sh toolkit DEST        nvcc, headers and libraries unpacked as a CUDA_HOME (bin/,
#                                         include/, lib/, lib64 -> lib, nvvm/, targets/x86_64-linux/)
#   cuda-from-pypi.sh math DEST           cuBLAS and cuRAND only (include/, lib/), for a CUDA 13 toolkit
#                                         that lacks them (such as one installed from the nvcc wheels)
#   cuda-from-pypi.sh runtime DEST        the libraries the CUDA Caffe bundle loads: libcudart.so.13,
#                                         libcublas.so.13, libcublasLt.so.13, libcurand.so.10 (in DEST/)
#   cuda-from-pypi.sh requirements [SET]  the pinned pip requirements of SET (toolkit, math or runtime;
#                                         default runtime), one a line: pip install $(... requirements)
#   cuda-from-pypi.sh release             the CUDA release (e.g. 13.0.2)
#   cuda-from-pypi.sh download REQ...     fetch the wheels of pinned requirements NAME==VERSION into
#                                         $TSFCN_CUDA_WHEELS (also the bundle's pure-Python ones) and
#                                         print their paths
#   cuda-from-pypi.sh -h | --help
#
# Wheels are fetched once with `python3 -m pip download --no-deps` into $TSFCN_CUDA_WHEELS (default
# /var/cache/ts-fcn/cuda-wheels; a folder that already holds them needs no network) and unpacked with
# python3's zipfile. DEST is written under a temporary name and renamed; a DEST already made from the
# same wheels is left as it is. Needs python3 (and pip, unless the wheels are there).
set -euo pipefail

# CUDA 13.0 Update 2 (PyPI's cuda-toolkit==13.0.2 pins exactly these). The driver must support CUDA 13
# (R580 or newer).
RELEASE=13.0.2
RUNTIME=(nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35)
MATH=(nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35)
TOOLKIT=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85
         nvidia-cuda-culibos==13.0.85 nvidia-cuda-profiler-api==13.0.85 "${RUNTIME[@]}")

wheels=${TSFCN_CUDA_WHEELS:-/var/cache/ts-fcn/cuda-wheels}
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
log() { echo "[cuda-from-pypi] $*" >&2; }
die() { log "error: $*"; exit 1; }

set_of() {
    case "$1" in
        toolkit) echo "${TOOLKIT[@]}" ;;
        math) echo "${MATH[@]}" ;;
        runtime) echo "${RUNTIME[@]}" ;;
        *) usage >&2; exit 2 ;;
    esac
}

# The wheel file of requirement NAME==VERSION in $wheels (empty when not there).
wheel_of() {
    local name=${1%%==*} version=${1#*==}
    ls "$wheels/${name//-/_}-$version-"*.whl 2>/dev/null | head -1
}

# Downloads the wheels of the requirements given that are not in $wheels yet.
fetch() {
    local missing=() r
    for r in "$@"; do [ -n "$(wheel_of "$r")" ] || missing+=("$r"); done
    [ ${#missing[@]} -eq 0 ] && return
    if ! python3 -m pip --version >/dev/null 2>&1; then
        # A fresh Debian/Ubuntu (CI) has python3 but not pip: its package, when we may install one.
        [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || die "python3 and pip are needed to fetch the CUDA wheels"
        log "installing python3-pip (apt-get)"
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            python3-pip ca-certificates; } >/dev/null || die "could not install python3-pip"
    fi
    mkdir -p "$wheels"
    log "downloading ${missing[*]} into $wheels"
    python3 -m pip download --no-deps --disable-pip-version-check -q -d "$wheels" "${missing[@]}" ||
        die "pip download failed (network? a TLS proxy needs PIP_CERT)"
    for r in "${missing[@]}"; do [ -n "$(wheel_of "$r")" ] || die "no wheel for $r after download"; done
}

# Unpacks the wheels' nvidia/cu13/* into DEST (modes kept); MODE toolkit|math|runtime.
unpack() {
    local mode=$1 dest=$2; shift 2
    local stamp="$RELEASE $mode: $*"
    if [ -f "$dest/.ts-fcn-cuda" ] && [ "$(cat "$dest/.ts-fcn-cuda")" = "$stamp" ]; then return; fi
    fetch "$@"
    local files=() r
    for r in "$@"; do files+=("$(wheel_of "$r")"); done
    mkdir -p "$(dirname "$dest")"
    local tmp; tmp=$(mktemp -d "$(dirname "$dest")/.cuda-pypi.XXXXXX")
    log "unpacking CUDA $RELEASE ($mode) into $dest"
    python3 - "$mode" "$tmp" "${files[@]}" <<'EOF' || { rm -rf "$tmp"; die "unpacking failed"; }
import os, sys, zipfile
mode, dest, wheels = sys.argv[1], sys.argv[2], sys.argv[3:]
runtime = ("libcudart.so.", "libcublas.so.", "libcublasLt.so.", "libcurand.so.")
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) < 4 or parts[0] != "nvidia" or not parts[-1] or parts[2] == ".metadata":
                continue
            rel = parts[2:]                       # nvidia/cu13/<bin|include|lib|nvvm>/...
            if mode == "math" and rel[0] not in ("include", "lib"):
                continue
            if mode == "runtime":
                if rel[0] != "lib" or not rel[-1].startswith(runtime):
                    continue
                rel = rel[1:]
            target = os.path.join(dest, *rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                dst.write(src.read())
            mode_bits = (info.external_attr >> 16) & 0o777
            os.chmod(target, mode_bits | 0o644 if mode_bits else 0o644)
EOF
    if [ "$mode" != runtime ]; then
        # Link-time names (the wheels ship only the versioned sonames), and the toolkit's usual layout.
        local so
        for so in "$tmp"/lib/lib*.so.*; do [ -e "$so" ] && ln -sf "$(basename "$so")" "${so%%.so.*}.so"; done
        if [ "$mode" = toolkit ]; then
            ln -s lib "$tmp/lib64"
            mkdir -p "$tmp/targets/x86_64-linux"
            ln -s ../../include "$tmp/targets/x86_64-linux/include"
            ln -s ../../lib "$tmp/targets/x86_64-linux/lib"
            "$tmp/bin/nvcc" --version >/dev/null || die "the unpacked nvcc does not run"
        fi
    fi
    echo "$stamp" >"$tmp/.ts-fcn-cuda"
    chmod 755 "$tmp"
    rm -rf "$dest" && mv "$tmp" "$dest"
}

cmd=${1:---help}
case "$cmd" in
    toolkit|math|runtime)
        [ $# -eq 2 ] || { usage >&2; exit 2; }
        # shellcheck disable=SC2046
        unpack "$cmd" "$2" $(set_of "$cmd") ;;
    requirements) set_of "${2:-runtime}" | tr ' ' '\n' ;;
    release) echo "$RELEASE" ;;
    download)
        shift
        [ $# -gt 0 ] || { usage >&2; exit 2; }
        for r in "$@"; do [[ "$r" == ?*==?* ]] || die "'$r' is not NAME==VERSION"; done
        fetch "$@"
        for r in "$@"; do wheel_of "$r"; done ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
