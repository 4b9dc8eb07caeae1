"""The Caffe runtime: real BVLC Caffe 1.0 (pycaffe and the caffe tool) and a verified BLAS core."""
import os
import subprocess

import numpy as np
import pytest

import caffe
from caffe import layers as L
from tools.runtime import blas_core

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_caffe_is_bvlc_1_0():
    assert caffe.__version__ == "1.0.0"
    out = subprocess.run(["caffe", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "1.0.0" in out.stdout + out.stderr


def test_caffe_tool_answers_help():
    out = subprocess.run(["caffe"], capture_output=True, text=True)
    text = out.stdout + out.stderr
    assert all(command in text for command in ("train", "test", "time", "device_query"))


def test_python_layers_compiled_in():
    # Debian's build has WITH_PYTHON_LAYER: the layer registry knows "Python".
    assert "Python" in caffe.layer_type_list()


def tiny_net(tmp_path):
    n = caffe.NetSpec()
    n.x = L.Input(shape=dict(dim=[2, 3]))
    n.t = L.Input(shape=dict(dim=[2, 4]))
    n.y = L.InnerProduct(n.x, num_output=4, weight_filler=dict(type="gaussian", std=0.5),
                         bias_filler=dict(type="constant", value=0.1))
    n.loss = L.EuclideanLoss(n.y, n.t)
    path = tmp_path / "tiny.prototxt"
    path.write_text("force_backward: true\n" + str(n.to_proto()))
    return caffe.Net(str(path), caffe.TRAIN)


def test_tiny_net_forward_backward_on_cpu(tmp_path):
    caffe.set_mode_cpu()
    net = tiny_net(tmp_path)
    rng = np.random.RandomState(0)
    net.blobs["x"].data[...] = rng.randn(2, 3)
    net.blobs["t"].data[...] = rng.randn(2, 4)
    loss = float(net.forward()["loss"])
    w, b = net.params["y"][0].data.copy(), net.params["y"][1].data.copy()
    y = net.blobs["x"].data @ w.T + b
    np.testing.assert_allclose(net.blobs["y"].data, y, rtol=1e-5)
    np.testing.assert_allclose(loss, ((y - net.blobs["t"].data) ** 2).sum() / 2 / 2, rtol=1e-5)
    net.backward()
    # d loss / d W = (y - t)^T x / N
    grad = (y - net.blobs["t"].data).T @ net.blobs["x"].data / 2
    np.testing.assert_allclose(net.params["y"][0].diff, grad, rtol=1e-4, atol=1e-6)


def test_blas_self_check_passes_and_core_is_in_use():
    rec = blas_core.current()
    assert rec["core"] is not None, "no OpenBLAS core passed the self-check"
    row = next(r for r in rec["candidates"] if r["core"] == rec["core"])
    assert row["ok"] and row["rel_error"] < blas_core.CHECK_TOLERANCE
    # The runtime exports the choice to every command it runs (unless the user set it himself).
    assert os.environ.get("OPENBLAS_CORETYPE") == rec["core"]


def test_blas_core_is_not_generic_on_avx2_cpus():
    flags = blas_core.cpu_flags()
    if not {"avx2", "fma"} <= flags:
        pytest.skip("CPU without AVX2/FMA: the generic core is the right choice")
    assert blas_core.current()["core"] != blas_core.GENERIC


def test_blas_falls_back_when_the_best_core_fails(monkeypatch):
    # A core that crashes (None) or computes wrong results must never be chosen.
    real_probe = blas_core.probe
    results = {"SkylakeX": None, "Haswell": (1e-2, 500.0)}
    monkeypatch.setattr(blas_core, "probe", lambda core: results[core] if core in results else real_probe(core))
    monkeypatch.setattr(blas_core, "cpu_flags", lambda: {"avx512f", "avx512bw", "avx512vl", "avx512dq",
                                                          "avx512cd", "avx2", "fma", "avx"})
    monkeypatch.delenv("TSFCN_BLAS_CORE", raising=False)
    rec = blas_core.choose()
    assert rec["core"] == "Sandybridge"
    assert [r["ok"] for r in rec["candidates"]] == [False, False, True]


def test_blas_override_is_checked_too(monkeypatch):
    monkeypatch.setenv("TSFCN_BLAS_CORE", "Prescott")
    rec = blas_core.choose()
    assert rec["forced"] == "Prescott" and rec["core"] == "Prescott"
