"""tools/bench: the FLOP counter on the real committed net, the results schema of a --quick run, the per-stage
profile and its figure, the PyTorch peer's export and its skip without a package index, and the output check
of variants. No timing is asserted: the bench measures, the tests check correctness."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import caffe

import paper
from prototxt import net
from tools.bench import cli, common, nets, peer, peer_host, report, stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def deploy_flops():
    return nets.count_flops(common.DEPLOY_PROTOTXT)


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
    f = nets.count_flops(path)
    side = paper.BLOB_SIDES["fc6"]
    assert f["layers"]["fc6"]["forward_gflop"] * 1e9 == pytest.approx(
        2 * 64 * 256 * 49 * side * side, rel=1e-9)
    assert f["layers"]["fc7"]["forward_gflop"] * 1e9 == pytest.approx(2 * 64 * 64 * side * side, rel=1e-9)


def test_fill_weights_is_deterministic_and_keeps_the_bilinear_filter(tmp_path):
    path = str(tmp_path / "narrow.prototxt")
    net.write(path, split="deploy", fc_channels=16)
    a, b = caffe.Net(path, caffe.TEST), caffe.Net(path, caffe.TEST)
    up = a.params["upscore"][0].data.copy()
    nets.fill_weights(a)
    nets.fill_weights(b)
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
    # the net stages and the profile (with the peer's export): data and segment have their own quick test.
    assert cli.main(["--quick", "--out", out, "--only", "machine,sgemm,flops,train,forward,profile",
                     "--save-outputs", ref, "--peer", "torch", "--peer-dir", str(d / "peer")]) == 0
    with open(out) as f:
        return json.load(f), out, ref


def test_quick_results_schema(quick):
    r, out, _ = quick
    assert r["quick"] is True and r["schema"] == 2
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
    # Stages not asked for are absent, not n/a.
    assert "data" not in r["stages"] and r["stages"]["train"]["status"] == "ok"
    assert os.path.exists(os.path.splitext(out)[0] + ".md")


def test_quick_outputs_compare_to_themselves(quick, tmp_path):
    """A variant run on the same BLAS reproduces the saved outputs (deterministic weights, seeded
    dropout): the check that BLAS/thread variants compute the same results."""
    _, _, ref = quick
    out = str(tmp_path / "again.json")
    assert cli.main(["--quick", "--out", out, "--only", "train,forward", "--compare", ref]) == 0
    with open(out) as f:
        diffs = json.load(f)["outputs_max_abs_diff"]
    assert set(diffs) == {"deploy_prob", "train_losses", "train_score"}
    assert diffs["deploy_prob"] < 1e-6 and diffs["train_losses"] < 1e-5


def test_missing_module_is_reported_not_a_crash(tmp_path, monkeypatch):
    def unavailable():
        raise common.NotAvailable("data_prep.phantoms not available yet (test)")
    monkeypatch.setattr(stages, "_phantoms", unavailable)
    out = str(tmp_path / "r.json")
    assert cli.main(["--quick", "--out", out, "--only", "data"]) == 0
    r = json.load(open(out))
    assert r["stages"]["data"]["status"] == "n/a"
    assert r["data_s_per_patient"] is None and "not available" in r["not_available"]["data_s_per_patient"]


def test_unknown_stage_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--out", str(tmp_path / "r.json"), "--only", "nonsense"])


def test_quick_data_and_segment_stages(tmp_path):
    """make data's per-stage split and the real `tools/segment.py` run on a small phantom."""
    out = str(tmp_path / "r.json")
    assert cli.main(["--quick", "--out", out, "--only", "data,segment"]) == 0
    r = json.load(open(out))
    assert r["stages"]["data"]["status"] == "ok", r["stages"]["data"]
    assert r["stages"]["segment"]["status"] == "ok", r["stages"]["segment"]
    parts = r["data_read_s"] + r["data_preprocess_s"] + r["data_hdf5_s"]
    assert 0 < parts <= r["data_s_per_patient"] * 1.0001
    assert r["segment_s"] > 0 and r["segment_slices"] == 4 and r["segment_tumor_slices"] >= 1


def test_quick_profile_splits_the_iteration(quick):
    """Every layer of the real train net is timed forward and backward, the GEMM layers against their
    ceiling; the solver's parts add up as derived; the table and the figure are written."""
    r, out, _ = quick
    p = r["profile"]
    layers = p["train_layers"]
    assert list(layers)[0] == "data" and list(layers)[-1] == "loss" and "conv1_1" in layers
    assert layers["data"]["type"] == "HDF5Data" and layers["loss"]["type"] == "Python"
    for name, layer in layers.items():
        assert layer["forward_s"] >= 0 and layer["backward_s"] >= 0, name
    fc6 = r["net_layers_gflop"]["fc6"]
    assert layers["fc6"]["forward_ceiling_s"] == pytest.approx(fc6["forward"] / r["sgemm_gflops"], rel=1e-3)
    assert layers["fc6"]["backward_ceiling_s"] == pytest.approx(
        (fc6["train"] - fc6["forward"]) / r["sgemm_gflops"], rel=1e-3)
    assert "forward_ceiling_s" not in layers["relu1_1"]
    assert p["python_loss_s"] == pytest.approx(layers["loss"]["forward_s"] + layers["loss"]["backward_s"])
    assert p["data_layer_s"] == layers["data"]["forward_s"]
    s = p["solver"]
    assert s["parameters"] > s["decayed_parameters"] > 0.98 * s["parameters"]   # biases and upscore: no decay
    assert s["regularisation_s"] == pytest.approx(max(0.0, s["apply_update_adam_s"] - s["apply_update_adam_no_decay_s"]))
    assert s["adam_update_s"] + s["apply_s"] == pytest.approx(s["apply_update_adam_no_decay_s"])
    assert p["step_rest_s"] == pytest.approx(
        p["train_step_s"] - p["layers_forward_s"] - p["layers_backward_s"] - s["apply_update_adam_s"])
    assert set(p["deploy_layers"]) >= {"conv1_1", "fc6", "prob"}
    rows = report.profile_rows(r)
    assert {row[0] for row in rows} == {"training iteration", "deploy forward, batch 1"}
    assert any(label.startswith("Python loss") for _, label, _, _ in rows)
    md = open(os.path.splitext(out)[0] + ".md").read()
    assert "## Where the time goes" in md and "regularisation" in md and "forward fc6" in md
    with open(os.path.join(os.path.dirname(out), report.FIGURE), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_peer_export_is_the_caffe_net(quick):
    """The peer gets the train net's layers and shapes from Caffe (nothing retyped) and the report's loss."""
    r, _, _ = quick
    assert r["peer"]["status"] == "exported"
    folder = r["peer"]["dir"]
    spec = json.load(open(os.path.join(folder, peer.SPEC)))
    arrays = np.load(os.path.join(folder, peer.ARRAYS))
    by_name = {layer["name"]: layer for layer in spec["layers"]}
    assert by_name["fc6"]["num_output"] == cli.QUICK_FC and by_name["fc6"]["kernel"] == paper.FC6_KERNEL
    assert by_name["upscore"]["params"][0]["lr_mult"] == 0 and by_name["upscore"]["group"] == paper.NUM_CLASSES
    assert by_name["loss"]["weights"] == pytest.approx(paper.CLASS_WEIGHTS) and by_name["loss"]["normalize"] is True
    assert spec["blob_shapes"]["pool2"][2:] == [paper.BLOB_SIDES["pool2"]] * 2    # Caffe's rounding up
    assert arrays["fc6/0"].shape == tuple(by_name["fc6"]["params"][0]["shape"])
    assert arrays["input/data"].shape == (1, paper.INPUT_CHANNELS, paper.INPUT_SIZE, paper.INPUT_SIZE)
    assert spec["solver"]["type"] == paper.SOLVER_TYPE
    assert spec["solver"]["weight_decay"] == pytest.approx(paper.WEIGHT_DECAY)
    assert np.isfinite(spec["caffe_test_loss"]) and spec["caffe_test_loss"] > 0


def test_peer_without_package_index_skips_and_says_so(quick, tmp_path, monkeypatch):
    """No package index: the peer is skipped with the reason, the bench's results stand, the export is removed."""
    r0, _, _ = quick
    results = str(tmp_path / "results.json")
    with open(results, "w") as f:
        json.dump(r0, f)
    monkeypatch.setenv("TSFCN_PEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert peer_host.main(["--results", results]) == 0
    r = json.load(open(results))
    assert r["peer"]["status"] == "n/a" and "package index" in r["peer"]["reason"]
    assert r["train_iter_s"] == r0["train_iter_s"]
    assert not os.path.exists(r0["peer"]["dir"])
    assert not os.path.exists(peer_host.cache_dir()) and not os.path.exists(peer_host.cache_dir() + ".partial")
    md = open(str(tmp_path / "results.md")).read()
    assert "PyTorch peer: skipped (PyTorch could not be installed from the package index" in md


def test_peer_ratio_and_targets():
    r = {"train_iter_s": 1.2, "forward_s": 0.3, "sgemm_gflops": 200.0, "net_gflop_per_image": 40.0,
         "net_train_gflop_per_image": 120.0, "segment_s": 7.0,
         "peer": {"status": "ok", "train_iter_s": 1.0, "forward_s": 0.6}}
    report.derive(r)
    assert r["peer"]["ratios"] == {"train_iter_s": pytest.approx(1.2), "forward_s": pytest.approx(0.5)}
    # training: 100 GFLOP/s = 50 % of the ceiling (met) but 1.2x the peer (not met); forward 67 % < 70 %.
    assert r["targets_met"] == {"train_iter_s": False, "forward_s": False, "segment_s": False}
    r["peer"]["train_iter_s"] = 2.4
    del r["peer"]["ratios"]
    assert report.derive(r)["targets_met"]["train_iter_s"] is True


def test_help_of_the_module():
    p = subprocess.run([sys.executable, "-m", "tools.bench", "--help"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0 and "--peer" in p.stdout and "profile" in p.stdout
