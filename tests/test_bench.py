"""tools/bench.py: the FLOP counter on the real committed net, the results schema of a --quick run, and
the output check of variants. No timing is asserted: the bench measures, the tests check correctness."""
import json
import os

import numpy as np
import pytest

import caffe

import paper
from prototxt import net
from tools import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def deploy_flops():
    return bench.count_flops(bench.DEPLOY_PROTOTXT)


def test_flops_of_the_committed_net_match_the_spec(deploy_flops):
    f = deploy_flops
    # SPEC §2: forward ≈ 38 GFLOP per image, fc6 alone ≈ 23.
    assert f["forward_gflop"] == pytest.approx(paper.FORWARD_GFLOP_APPROX, rel=0.03)
    assert f["layers"]["fc6"]["forward_gflop"] == pytest.approx(23.0, rel=0.02)
    # Exactly 2 x MACs from the blob shapes: fc6 = 4096 x (256 x 7 x 7) x 15 x 15 MACs.
    side = paper.BLOB_SIDES["fc6"]
    fc6_macs = paper.FC6_CHANNELS * paper.CONV_BLOCKS[-1][0] * paper.FC6_KERNEL ** 2 * side * side
    assert f["layers"]["fc6"]["forward_gflop"] * 1e9 == pytest.approx(2 * fc6_macs, rel=1e-9)
    # conv1_1 works on the 162x162 output of its pad-32 convolution.
    c11 = 2 * 64 * 3 * 9 * paper.BLOB_SIDES["conv1_1"] ** 2
    assert f["layers"]["conv1_1"]["forward_gflop"] * 1e9 == pytest.approx(c11, rel=1e-9)
    # The deconvolution counts its input pixels: 2 classes x 1 (grouped) x 16 x 16 x 15 x 15.
    up = 2 * paper.NUM_CLASSES * paper.UPSCORE_KERNEL ** 2 * side * side
    assert f["layers"]["upscore"]["forward_gflop"] * 1e9 == pytest.approx(up, rel=1e-9)
    assert set(f["layers"]) == {"conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2",
                                "fc6", "fc7", "score", "upscore"}


def test_training_flops_are_forward_plus_both_gradients(deploy_flops):
    f = deploy_flops
    layers = f["layers"]
    # No bottom gradient into the data, no weight gradient for the frozen bilinear upsampling.
    assert layers["conv1_1"]["train_gflop"] == pytest.approx(2 * layers["conv1_1"]["forward_gflop"])
    assert layers["upscore"]["train_gflop"] == pytest.approx(2 * layers["upscore"]["forward_gflop"])
    assert layers["fc6"]["train_gflop"] == pytest.approx(3 * layers["fc6"]["forward_gflop"])
    assert 2.9 * f["forward_gflop"] < f["train_gflop"] < 3 * f["forward_gflop"]


def test_flops_follow_the_net_width(tmp_path):
    """A narrower fc6/fc7 changes exactly those layers (and score's input)."""
    path = str(tmp_path / "narrow.prototxt")
    net.write(path, split="deploy", fc_channels=64)
    f = bench.count_flops(path)
    side = paper.BLOB_SIDES["fc6"]
    assert f["layers"]["fc6"]["forward_gflop"] * 1e9 == pytest.approx(
        2 * 64 * 256 * 49 * side * side, rel=1e-9)
    assert f["layers"]["fc7"]["forward_gflop"] * 1e9 == pytest.approx(2 * 64 * 64 * side * side, rel=1e-9)


def test_fill_weights_is_deterministic_and_keeps_the_bilinear_filter(tmp_path):
    path = str(tmp_path / "narrow.prototxt")
    net.write(path, split="deploy", fc_channels=16)
    a, b = caffe.Net(path, caffe.TEST), caffe.Net(path, caffe.TEST)
    up = a.params["upscore"][0].data.copy()
    bench.fill_weights(a)
    bench.fill_weights(b)
    for name in a.params:
        for pa, pb in zip(a.params[name], b.params[name]):
            np.testing.assert_array_equal(pa.data, pb.data)
    np.testing.assert_array_equal(a.params["upscore"][0].data, up)
    assert up.max() > 0.5  # the bilinear kernel, not zeros


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    out = str(d / "results.json")
    ref = str(d / "ref.npz")
    # train/forward/sgemm/flops only: the data and segment stages have their own quick test below.
    assert bench.main(["--quick", "--out", out, "--only", "machine,sgemm,flops,train,forward",
                       "--save-outputs", ref]) == 0
    with open(out) as f:
        return json.load(f), out, ref


def test_quick_results_schema(quick):
    r, out, _ = quick
    assert r["quick"] is True and r["schema"] == 1
    for key in ("train_iter_s", "train_iter_infogain_s", "forward_s", "forward_b16_s", "sgemm_gflops",
                "net_gflop_per_image", "net_train_gflop_per_image"):
        assert isinstance(r[key], float) and r[key] > 0, key
    for key in ("train_iter_s", "forward_s"):
        eff = r["efficiency"][key]
        assert eff["gflops"] == pytest.approx(
            (r["net_train_gflop_per_image"] if key.startswith("train") else r["net_gflop_per_image"]) / r[key])
        assert eff["fraction_of_sgemm"] == pytest.approx(eff["gflops"] / r["sgemm_gflops"])
    m = r["machine"]
    assert m["cpus"] >= 1 and m["caffe"] and m["numpy"] == np.__version__
    assert any("blas" in os.path.basename(p) or "mkl" in p or "blis" in p for p in m["blas_libraries"])
    # The per-layer split of the training iteration names the real layers.
    assert {"conv1_1", "fc6", "loss"} <= set(r["train_layers"])
    # Stages not asked for are absent, not n/a.
    assert "data" not in r["stages"] and r["stages"]["train"]["status"] == "ok"
    assert os.path.exists(os.path.splitext(out)[0] + ".md")


def test_quick_outputs_compare_to_themselves(quick, tmp_path):
    """A variant run on the same BLAS reproduces the saved outputs (deterministic weights, seeded
    dropout): the check that BLAS/thread variants compute the same results."""
    _, _, ref = quick
    out = str(tmp_path / "again.json")
    assert bench.main(["--quick", "--out", out, "--only", "train,forward", "--compare", ref]) == 0
    with open(out) as f:
        diffs = json.load(f)["outputs_max_abs_diff"]
    assert set(diffs) == {"deploy_prob", "train_losses", "train_score"}
    assert diffs["deploy_prob"] < 1e-6 and diffs["train_losses"] < 1e-5


def test_missing_module_is_reported_not_a_crash(tmp_path, monkeypatch):
    def unavailable():
        raise bench.NotAvailable("data_prep.phantoms not available yet (test)")
    monkeypatch.setattr(bench, "_phantoms", unavailable)
    out = str(tmp_path / "r.json")
    assert bench.main(["--quick", "--out", out, "--only", "data"]) == 0
    r = json.load(open(out))
    assert r["stages"]["data"]["status"] == "n/a"
    assert r["data_s_per_patient"] is None and "not available" in r["not_available"]["data_s_per_patient"]


def test_unknown_stage_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path / "r.json"), "--only", "nonsense"])


def test_quick_data_and_segment_stages(tmp_path):
    """make data's per-stage split and the real `tools/segment.py` run on a small phantom."""
    out = str(tmp_path / "r.json")
    assert bench.main(["--quick", "--out", out, "--only", "data,segment"]) == 0
    r = json.load(open(out))
    assert r["stages"]["data"]["status"] == "ok", r["stages"]["data"]
    assert r["stages"]["segment"]["status"] == "ok", r["stages"]["segment"]
    parts = r["data_read_s"] + r["data_preprocess_s"] + r["data_hdf5_s"]
    assert 0 < parts <= r["data_s_per_patient"] * 1.0001
    assert r["segment_s"] > 0 and r["segment_slices"] == 4 and r["segment_tumor_slices"] >= 1
