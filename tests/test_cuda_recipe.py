"""The CUDA Caffe recipe (tools/cuda/): cheap checks only; the build itself (minutes) runs from .ci/run.

- the scripts parse, answer --help, and refuse bad input before doing anything;
- the project's patches apply cleanly to Debian 11's caffe source when it is cached (a pure-Python
  unified-diff check: every hunk's context must match exactly once);
- the pinned CUDA release (tools/cuda/cuda-from-pypi.sh): one release, its wheels unpacked as asked;
- a built bundle (build/caffe-cuda-sm*.tar.xz) has the layout tools/cuda/use-bundle.sh relies on and
  the GPU proof's modules, within 60 MB;
- the GPU proof's checks run, on the CPU, against the real nets (gpu=None); with a bundle in build/ and
  the CUDA runtime libraries in build/cuda-runtime (cuda-from-pypi.sh runtime build/cuda-runtime), the
  proof's CPU half runs from the bundle alone, and `use-bundle.sh check` says in one line that there is
  no GPU.
"""
import glob
import json
import os
import re
import subprocess
import tarfile
import tempfile
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = os.path.join(REPO, "tools", "cuda")
PATCHES = sorted(glob.glob(os.path.join(CUDA, "patches", "*.patch")))
# Where build-caffe-cuda.sh extracts the source package (bind it into the runtime to run that test).
SOURCE = os.environ.get("TSFCN_CAFFE_SOURCE",
                        "/var/cache/ts-fcn/caffe-cuda-build/opt/ts-fcn-cuda/src/caffe")


def run(*cmd, env=None, timeout=60):
    return subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=timeout, env=env)


@pytest.mark.parametrize("script", ["build-caffe-cuda.sh", "use-bundle.sh", "pack-bundle.sh", "gpu-proof.sh",
                                    "cuda-from-pypi.sh", "gpu-image-test.sh"])
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


PYPI = os.path.join(CUDA, "cuda-from-pypi.sh")


def pins(which):
    r = run("bash", PYPI, "requirements", which)
    assert r.returncode == 0, r.stdout
    return dict(line.split("==") for line in r.stdout.split())


def test_cuda_from_pypi_is_one_pinned_release():
    release = run("bash", PYPI, "release").stdout.strip()
    assert re.fullmatch(r"1[2-9]\.\d+\.\d+", release), release
    runtime, math, toolkit = pins("runtime"), pins("math"), pins("toolkit")
    assert set(runtime) == {"nvidia-cuda-runtime", "nvidia-cublas", "nvidia-curand"}
    assert all(re.fullmatch(r"\d+(\.\d+)+", v) for v in toolkit.values()), toolkit    # exact versions
    # one release: the same versions wherever a package appears; the compiler matches the runtime's CUDA
    for name, version in list(runtime.items()) + list(math.items()):
        assert toolkit[name] == version, name
    assert toolkit["nvidia-cuda-nvcc"].split(".")[:2] == release.split(".")[:2]
    assert toolkit["nvidia-cuda-runtime"].split(".")[:2] == release.split(".")[:2]
    r = run("bash", PYPI, "requirements", "everything")
    assert r.returncode == 2
    r = run("bash", PYPI, "--help")
    assert r.returncode == 0 and "TSFCN_CUDA_WHEELS" in r.stdout
    r = run("bash", PYPI, "runtime")
    assert r.returncode == 2
    r = run("bash", PYPI, "download", "nvidia-cublas")                  # unpinned: refused
    assert r.returncode == 1 and "NAME==VERSION" in r.stdout


def _fake_wheels(folder, which):
    """Wheels named and laid out as NVIDIA's (nvidia/cu13/...), holding small files: what the unpacking
    sees of the real ones, without their gigabyte."""
    for name, version in pins(which).items():
        path = os.path.join(folder, "%s-%s-py3-none-manylinux_2_27_x86_64.whl" % (name.replace("-", "_"), version))
        with zipfile.ZipFile(path, "w") as z:
            short = name.split("-")[-1]
            lib = {"runtime": "libcudart.so.13", "cublas": "libcublas.so.13", "curand": "libcurand.so.10"}[short]
            z.writestr("nvidia/cu13/lib/" + lib, "elf " + name)
            z.writestr("nvidia/cu13/include/%s.h" % short, "/* %s */" % name)
            z.writestr("nvidia/cu13/.metadata/provenance.txt", "x")
            z.writestr("%s-%s.dist-info/METADATA" % (name.replace("-", "_"), version), "Name: " + name)
            if short == "cublas":
                z.writestr("nvidia/cu13/lib/libcublasLt.so.13", "elf lt")


def test_cuda_from_pypi_unpacks_what_is_asked(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheels(str(wheels), "runtime")
    env = dict(os.environ, TSFCN_CUDA_WHEELS=str(wheels))
    dest = tmp_path / "rt"
    r = run("bash", PYPI, "runtime", str(dest), env=env)
    assert r.returncode == 0, r.stdout
    assert sorted(p for p in os.listdir(str(dest)) if not p.startswith(".")) == \
        ["libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13", "libcurand.so.10"]
    assert (dest / "libcudart.so.13").read_text() == "elf nvidia-cuda-runtime"
    stamp = (dest / ".ts-fcn-cuda").read_text()
    (dest / "libcurand.so.10").write_text("kept")            # the same wheels again: left as it is
    assert run("bash", PYPI, "runtime", str(dest), env=env).returncode == 0
    assert (dest / "libcurand.so.10").read_text() == "kept" and (dest / ".ts-fcn-cuda").read_text() == stamp
    math = tmp_path / "math"
    r = run("bash", PYPI, "math", str(math), env=env)
    assert r.returncode == 0, r.stdout
    assert (math / "include" / "cublas.h").exists() and os.readlink(str(math / "lib" / "libcublas.so")) == \
        "libcublas.so.13"
    assert not (math / "lib" / "libcudart.so.13").exists() and not (math / ".metadata").exists()
    # a wheel that is neither here nor downloadable: one line, no half-made folder
    os.remove(next(str(p) for p in wheels.iterdir() if "curand" in p.name))
    r = run("bash", PYPI, "math", str(tmp_path / "m2"), env=dict(env, PIP_INDEX_URL="http://127.0.0.1:9/",
                                                                   PIP_NO_INDEX="1", PIP_FIND_LINKS=""))
    assert r.returncode == 1 and "error" in r.stdout and not (tmp_path / "m2").exists(), r.stdout


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
                 "python/caffe/pycaffe.py", "py/python3.9", "lib/python3.9/os.py", "use-bundle.sh"):
        assert "%s/%s" % (top, need) in names, need
    for module in ("numpy", "google/protobuf", "h5py", "tqdm", "scipy/ndimage", "pydicom"):  # the GPU proof's
        assert "%s/lib/python3/dist-packages/%s/__init__.py" % (top, module) in names, module
    assert os.path.getsize(path) <= 60e6
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


def _bundle_env():
    """(unpacked bundle folder, environment with TSFCN_CUDA_LIBS) or skip: needs a bundle in build/ and
    the CUDA runtime libraries in build/cuda-runtime."""
    libs = os.path.join(REPO, "build", "cuda-runtime")
    if not BUNDLES or not os.path.exists(os.path.join(libs, "libcublas.so.13")):
        pytest.skip("needs build/caffe-cuda-sm*.tar.xz (make caffe-cuda) and build/cuda-runtime "
                    "(bash tools/cuda/cuda-from-pypi.sh runtime build/cuda-runtime)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["TSFCN_CUDA_LIBS"] = libs
    r = run("bash", os.path.join(CUDA, "use-bundle.sh"), "unpack", BUNDLES[-1], "--dest",
            os.path.join(tempfile.gettempdir(), "ts-fcn-test-" + os.path.basename(BUNDLES[-1])[:-7]), env=env,
            timeout=300)
    assert r.returncode == 0, r.stdout
    return r.stdout.strip().splitlines()[-1], env


def test_device_check_without_gpu_is_one_line():
    if os.path.exists("/dev/nvidia0"):
        pytest.skip("this machine has a GPU")
    folder, env = _bundle_env()
    r = run("bash", os.path.join(CUDA, "use-bundle.sh"), "check", "--dir", folder, env=env)
    assert r.returncode == 1, r.stdout
    errors = [line for line in r.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and "GPU 0 is not usable: caffe device_query failed" in errors[0], r.stdout
    assert "stack trace" not in r.stdout and "@ " not in r.stdout


def test_gpu_proof_cpu_half_from_the_bundle(tmp_path):
    folder, env = _bundle_env()
    env["OUT"] = str(tmp_path / "proof")
    r = run("bash", os.path.join(CUDA, "gpu-proof.sh"), "--cpu", BUNDLES[-1], env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:]
    with open(str(tmp_path / "proof" / "gpu_proof.json")) as f:
        result = json.load(f)
    assert result["passed"] and result["cuda_build"] and result["python"].startswith("3.9"), result
    bundle_dir = os.path.realpath(os.path.join(tempfile.gettempdir(), "ts-fcn-" + os.path.basename(BUNDLES[-1])[:-7]))
    for module, where in result["modules"].items():        # everything from the bundle, nothing of the runtime
        assert os.path.realpath(where).startswith(bundle_dir), (module, where)
    assert len(result["cpu_vs_gpu"]["cpu"]) == result["sizes"]["compare_iters"]
    assert result["loss_layers"]["passed"] and result["caffe_time"]["forward_backward_ms"] > 0
    training = result["fast_training"]
    assert training["iterations"] == result["sizes"]["max_iter"] and 0 <= training["mean_dice_3d"] <= 1
    assert result["paper_estimate"]["max_iter"] == 5 * result["paper_estimate"]["epoch_iterations"]
    assert result["paper_estimate"]["expected_hours"] > 0
