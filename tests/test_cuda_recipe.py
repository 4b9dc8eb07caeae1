"""The CUDA Caffe recipe (tools/cuda/): cheap checks only; the build itself (minutes) runs from .ci/run.

- the scripts parse, answer --help, and refuse bad input before doing anything;
- the project's patches apply cleanly to Debian 11's caffe source when it is cached (a pure-Python
  unified-diff check: every hunk's context must match exactly once);
- a built bundle (build/caffe-cuda-sm*.tar.xz) has the layout tools/cuda/use-bundle.sh relies on;
- the GPU proof's checks run, on the CPU, against the real nets (gpu=None).
"""
import glob
import json
import os
import subprocess
import tarfile
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = os.path.join(REPO, "tools", "cuda")
PATCHES = sorted(glob.glob(os.path.join(CUDA, "patches", "*.patch")))
# Where build-caffe-cuda.sh extracts the source package (bind it into the runtime to run that test).
SOURCE = os.environ.get("TSFCN_CAFFE_SOURCE",
                        "/var/cache/ts-fcn/caffe-cuda-build/opt/ts-fcn-cuda/src/caffe")


def run(*cmd):
    return subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=60)


@pytest.mark.parametrize("script", ["build-caffe-cuda.sh", "use-bundle.sh", "pack-bundle.sh", "gpu-proof.sh"])
def test_scripts_parse(script):
    r = run("bash", "-n", os.path.join(CUDA, script))
    assert r.returncode == 0, r.stdout


def test_build_script_help_and_refusals():
    r = run("bash", os.path.join(CUDA, "build-caffe-cuda.sh"), "--help")
    assert r.returncode == 0 and "--native" in r.stdout and "CUDA_HOME" in r.stdout, r.stdout
    r = run("bash", os.path.join(CUDA, "build-caffe-cuda.sh"))
    assert r.returncode == 2
    r = run("bash", os.path.join(CUDA, "build-caffe-cuda.sh"), "sm_90")
    assert r.returncode == 1 and "not like 90" in r.stdout


def test_use_bundle_help_and_missing_bundle():
    r = run("bash", os.path.join(CUDA, "use-bundle.sh"), "--help")
    assert r.returncode == 0 and "unpack" in r.stdout and "--portable" in r.stdout
    r = run("bash", os.path.join(CUDA, "use-bundle.sh"), "unpack", "/nonexistent/caffe-cuda-sm1.tar.xz")
    assert r.returncode == 1 and "make caffe-cuda" in r.stdout


def parse_patch(path):
    """[(file, [(old_lines, new_lines), ...])] of a unified diff."""
    files, hunk = [], None
    for line in open(path).read().splitlines():
        if line.startswith("--- "):
            continue
        if line.startswith("+++ "):
            files.append((line[4:].split("\t")[0].split("/", 1)[1], []))
        elif line.startswith("@@"):
            hunk = ([], [])
            files[-1][1].append(hunk)
        elif hunk is not None and line[:1] in (" ", "-", "+", ""):
            text = line[1:]
            if line[:1] in (" ", "-", ""):
                hunk[0].append(text)
            if line[:1] in (" ", "+", ""):
                hunk[1].append(text)
    return files


def apply_patch(path, root):
    """{file: patched text}; fails when a hunk's context is not found exactly once."""
    out = {}
    for name, hunks in parse_patch(path):
        text = open(os.path.join(root, name)).read()
        for old, new in hunks:
            old_s, new_s = "\n".join(old) + "\n", "\n".join(new) + "\n"
            assert text.count(old_s) == 1, "%s: a hunk does not apply to %s" % (os.path.basename(path), name)
            text = text.replace(old_s, new_s)
        out[name] = text
    return out


def test_patches_are_documented():
    assert PATCHES, "no patches in tools/cuda/patches"
    readme = open(os.path.join(CUDA, "patches", "README.md")).read()
    for p in PATCHES:
        assert os.path.basename(p) in readme, "%s is not explained in the README" % p


@pytest.mark.skipif(not os.path.isdir(SOURCE), reason="Debian's caffe source is not cached here (%s); "
                    "make caffe-cuda fetches it" % SOURCE)
def test_patches_apply_to_debian_source():
    patched = {}
    for p in PATCHES:
        patched.update(apply_patch(p, SOURCE))
    common = patched["src/caffe/common.cpp"]
    for field in ("clockRate", "deviceOverlap", "kernelExecTimeoutEnabled"):
        assert "prop.%s" % field not in common      # the fields CUDA 13 removed
    assert "cudaDevAttrClockRate" in common
    assert "except ImportError" in patched["python/caffe/io.py"]


BUNDLES = sorted(glob.glob(os.path.join(REPO, "build", "caffe-cuda-sm*.tar.xz")))


@pytest.mark.skipif(not BUNDLES, reason="no bundle in build/ (make caffe-cuda makes it)")
def test_bundle_layout():
    path = BUNDLES[-1]
    top = os.path.basename(path)[:-len(".tar.xz")]
    with tarfile.open(path) as tar:
        names = set(tar.getnames())
        info = json.load(tar.extractfile(top + "/BUNDLE.json"))
    for need in ("bin/caffe", "python/caffe/_caffe.so", "python/caffe/proto/caffe_pb2.py",
                 "python/caffe/pycaffe.py", "py/python3.9", "lib/python3.9/os.py",
                 "lib/python3/dist-packages/numpy/__init__.py", "use-bundle.sh"):
        assert "%s/%s" % (top, need) in names, need
    libs = {os.path.basename(n) for n in names if n.startswith(top + "/lib/") and n.count("/") == 2}
    assert any(n.startswith("libcaffe.so") for n in libs)
    assert any(n.startswith("libglog.so") for n in libs) and any(n.startswith("libprotobuf.so") for n in libs)
    # CUDA comes from the GPU machine; glibc from the system.
    assert not [n for n in libs if n.startswith(("libcudart", "libcublas", "libcurand", "libcuda.", "libc.so"))]
    assert info["architectures"] == top.split("-sm")[1].split("_")
    assert {"libcudart.so.13", "libcublas.so.13", "libcurand.so.10", "libcuda.so.1"} <= set(info["cuda_sonames_needed"])


def _gpu_proof():
    from tools.cuda import gpu_proof
    return gpu_proof


def _gpu_available():
    from tools import caffe_net
    return caffe_net.cuda_build() and os.path.exists("/dev/nvidia0")


@pytest.mark.skipif(not _gpu_available(), reason="needs a CUDA build of Caffe and a GPU (without one, both halves "
                    "would run on the CPU and compare nothing)")
def test_gpu_proof_cpu_vs_gpu():
    with tempfile.TemporaryDirectory() as tmp:
        a = _gpu_proof().check_cpu_vs_gpu(tmp, 0, 5)
        assert a["passed"] and len(a["gpu"]) == 5 and all(v > 0 for v in a["cpu"])


def test_gpu_proof_checks_run_on_cpu():
    gpu_proof = _gpu_proof()
    with tempfile.TemporaryDirectory() as tmp:
        b = gpu_proof.check_loss_layers(tmp, None, 2, fc_channels=64)
        assert b["passed"], b
        assert sorted(b["curves"]) == ["infogain", "python"]
