"""prototxt/net.py in real Caffe: blob sizes, crop offsets, upsampling, learning rates, committed files,
the loss variants, `caffe test` Dice counts and a short `caffe train` with the Python loss."""
import os
import re
import subprocess

import h5py
import numpy as np
import pytest
from google.protobuf import text_format

import caffe
from caffe.proto import caffe_pb2

import paper
from prototxt import net as tsnet
from tools import caffe_net

caffe_net.use_device()
# the runtime quiets glog (GLOG_minloglevel=1); these tests read Caffe's INFO lines
CAFFE_ENV = dict(os.environ, GLOG_minloglevel="0")
NARROW = 64   # fc6/fc7 width of the small nets built the same way (the real one is 4096)


@pytest.fixture(scope="module")
def deploy_net():
    """The real deploy net (68 M parameters), built once."""
    return caffe.Net(tsnet.COMMITTED["deploy"], caffe.TEST)


def _read(path):
    proto = caffe_pb2.NetParameter()
    text_format.Merge(open(path).read(), proto)
    return proto


def _layers(proto):
    return {layer.name: layer for layer in proto.layer}


def _write_h5(folder, name, n, side, seed):
    """A tiny HDF5 set in the PREP layout: a bright disc is the tumor."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:side, :side]
    data = np.zeros((n, 3, side, side), np.float32)
    label = np.zeros((n, 1, side, side), np.float32)
    for i in range(n):
        cy, cx = rng.randint(side // 3, 2 * side // 3, size=2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (side // 5) ** 2
        label[i, 0] = disc
        data[i] = disc * 60.0 - 30.0 + rng.randn(3, side, side) * 5
    path = os.path.join(folder, name)
    with h5py.File(path, "w") as f:
        f["data"], f["label"] = data, label
    return path


def test_committed_prototxt_equal_a_regeneration():
    assert tsnet.check() == []
    out = subprocess.run(["python3", "-m", "prototxt.net", "--check"], cwd=os.path.dirname(
        tsnet.HERE), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert out.returncode == 0, out.stdout


def test_check_fails_on_a_changed_file(tmp_path, monkeypatch):
    stale = tmp_path / "deploy.prototxt"
    stale.write_text(open(tsnet.COMMITTED["deploy"]).read().replace("pad: 32", "pad: 30"))
    monkeypatch.setitem(tsnet.COMMITTED, "deploy", str(stale))
    assert tsnet.main(["--check"]) == 1
    assert stale.read_text().count("pad: 30") == 1   # --check writes nothing


def test_blob_sides_in_real_caffe(deploy_net):
    shapes = {name: blob.data.shape for name, blob in deploy_net.blobs.items()}
    for name, side in paper.BLOB_SIDES.items():
        assert shapes[name][2:] == (side, side), name
    assert shapes["data"] == (1, paper.INPUT_CHANNELS, paper.INPUT_SIZE, paper.INPUT_SIZE)
    assert shapes["fc6"][1] == paper.FC6_CHANNELS and shapes["fc7"][1] == paper.FC7_CHANNELS
    for name in ("score", "upscore", "score_crop", "prob"):
        assert shapes[name][1] == paper.NUM_CLASSES
    assert shapes["prob"] == shapes["score_crop"]
    assert deploy_net.params["fc6"][0].data.shape == (paper.FC6_CHANNELS, 256, paper.FC6_KERNEL,
                                                      paper.FC6_KERNEL)
    n_params = sum(p.data.size for ps in deploy_net.params.values() for p in ps)
    assert abs(n_params - paper.PARAMETERS_APPROX) / paper.PARAMETERS_APPROX < 0.05


def test_crop_offsets():
    assert tsnet.crop_offset("center") == paper.CROP_OFFSET_CENTER == 14
    assert tsnet.crop_offset("aligned") == 11      # SPEC §7: what caffe.coord_map derives
    layers = _layers(tsnet.ts_fcn("deploy", crop_mode="aligned"))
    assert list(layers["score_crop"].crop_param.offset) == [11]
    assert list(_layers(_read(tsnet.COMMITTED["train"]))["score_crop"].crop_param.offset) == [14]
    with pytest.raises(ValueError, match="crop_mode"):
        tsnet.crop_offset("corner")


@pytest.mark.parametrize("crop_mode", paper.CROP_MODES)
def test_constant_scores_upsample_to_constants_per_class(deploy_net, crop_mode):
    net = deploy_net
    w = net.params["upscore"]
    assert len(w) == 1 and w[0].data.shape == (paper.NUM_CLASSES, 1, paper.UPSCORE_KERNEL,
                                                paper.UPSCORE_KERNEL)  # no bias, one filter/class
    offset = tsnet.crop_offset(crop_mode)
    net.blobs["score"].data[0, 0] = 3.0
    net.blobs["score"].data[0, 1] = -2.0
    net.forward(start="upscore", end="upscore")
    side = paper.INPUT_SIZE
    inside = net.blobs["upscore"].data[0, :, offset:offset + side, offset:offset + side]
    np.testing.assert_allclose(inside[0], 3.0, atol=1e-5)   # mixing would give 1.0 in both
    np.testing.assert_allclose(inside[1], -2.0, atol=1e-5)
    if crop_mode == "center":
        net.forward(start="score_crop", end="prob")
        np.testing.assert_allclose(net.blobs["score_crop"].data[0], inside)
        p = np.exp(3.0) / (np.exp(3.0) + np.exp(-2.0))
        np.testing.assert_allclose(net.blobs["prob"].data[0, 0], p, rtol=1e-5)


def test_learning_rates_and_fillers():
    layers = _layers(_read(tsnet.COMMITTED["train"]))
    convs = [l for l in layers.values() if l.type == "Convolution"]
    assert [l.name for l in convs] == list(paper.PRETRAINED_LAYERS) + ["fc6", "fc7", "score"]
    for layer in convs:
        w, b = layer.param
        base = paper.PRETRAINED_LR_MULT if layer.name in paper.PRETRAINED_LAYERS else 1.0
        assert w.lr_mult == pytest.approx(base) and w.decay_mult == 1
        assert b.lr_mult == pytest.approx(2 * base) and b.decay_mult == 0
        assert layer.convolution_param.weight_filler.type in ("msra", "gaussian")
    up = layers["upscore"]
    assert up.type == "Deconvolution" and [p.lr_mult for p in up.param] == [0]
    cp = up.convolution_param
    assert (cp.kernel_size, cp.stride, cp.group, cp.bias_term, cp.weight_filler.type) == (
        [paper.UPSCORE_KERNEL], [paper.UPSCORE_STRIDE], paper.NUM_CLASSES, False, "bilinear")
    assert [l.dropout_param.dropout_ratio for l in layers.values() if l.type == "Dropout"] == [
        paper.DROPOUT_RATIO] * 2
    assert layers["data"].hdf5_data_param.shuffle and layers["data"].hdf5_data_param.source == "train.txt"
    assert layers["loss"].loss_weight == [1]


def test_val_and_deploy_tops():
    val = _layers(_read(tsnet.COMMITTED["val"]))
    assert not val["data"].hdf5_data_param.shuffle and val["data"].hdf5_data_param.source == "val.txt"
    assert list(val["dice"].top) == list(tsnet.DICE_TOPS)
    assert list(val["dice"].bottom) == ["score_crop", "label"]
    assert "prob" in val and "loss" in val
    deploy = _layers(_read(tsnet.COMMITTED["deploy"]))
    assert "loss" not in deploy and deploy["prob"].type == "Softmax"
    with pytest.raises(ValueError, match="split"):
        tsnet.ts_fcn("test")


def test_python_and_infogain_loss_agree_in_the_net(tmp_path, monkeypatch):
    """The same narrow val net with either loss, same weights and data: same loss value
    (normalised and plain sum)."""
    _write_h5(str(tmp_path), "a.h5", 2, 36, seed=0)
    (tmp_path / "val.txt").write_text("a.h5\n")
    monkeypatch.chdir(str(tmp_path))
    values = {}
    weights = str(tmp_path / "w.caffemodel")
    for normalize in (True, False):
        for loss in tsnet.LOSSES:
            path = str(tmp_path / ("val_%s_%d.prototxt" % (loss, normalize)))
            tsnet.write(path, split="val", loss=loss, normalize=normalize, fc_channels=NARROW)
            if loss == "infogain":
                assert os.path.isabs(_layers(_read(path))["loss"].infogain_loss_param.source)
            if not os.path.exists(weights):
                caffe.Net(path, caffe.TEST).save(weights)
            net = caffe.Net(path, caffe.TEST, weights=weights)
            values[loss, normalize] = float(net.forward()["loss"])
    for normalize in (True, False):
        assert values["python", normalize] == pytest.approx(values["infogain", normalize], rel=1e-5)
    assert values["python", False] == pytest.approx(values["python", True] * 36 * 36, rel=1e-4)


def test_caffe_test_prints_dice_counts(tmp_path, monkeypatch):
    _write_h5(str(tmp_path), "a.h5", 2, 36, seed=1)
    (tmp_path / "val.txt").write_text("a.h5\n")
    model = str(tmp_path / "val.prototxt")
    tsnet.write(model, fc_channels=NARROW)
    monkeypatch.chdir(str(tmp_path))   # HDF5Data reads val.txt from the working directory
    caffe.Net(model, caffe.TEST).save(str(tmp_path / "w.caffemodel"))
    out = subprocess.run(["caffe", "test", "-model", model, "-weights", "w.caffemodel",
                          "-iterations", "2"], cwd=str(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, env=CAFFE_ENV)
    assert out.returncode == 0, out.stdout[-3000:]
    final = dict(re.findall(r"\] (dice_\w+|loss) = ([-\d.e+]+)", out.stdout.split("Loss:")[-1]))
    assert set(final) == set(tsnet.DICE_TOPS) | {"loss"}   # prob is silenced: a short log
    assert "prob =" not in out.stdout
    truth = h5py.File(str(tmp_path / "a.h5"), "r")["label"][()].sum() / 2   # mean per iteration
    assert float(final["dice_truth"]) == pytest.approx(truth)
    assert 0 <= float(final["dice_intersection"]) <= float(final["dice_predicted"])


def test_caffe_train_python_loss_goes_down(tmp_path, monkeypatch):
    """`caffe train` (the binary) on a tiny HDF5 set: a few Adam iterations with the Python loss;
    the loss (TEST phase, no dropout noise) of the trained weights is well below the initial one."""
    _write_h5(str(tmp_path), "a_aug.h5", 1, 36, seed=2)
    (tmp_path / "train.txt").write_text("a_aug.h5\n")
    model = str(tmp_path / "train.prototxt")
    tsnet.write(model, fc_channels=NARROW)
    monkeypatch.chdir(str(tmp_path))
    caffe.set_random_seed(0)   # the same MSRA start every run
    init = caffe.Net(model, caffe.TEST)
    init.save("init.caffemodel")
    loss0 = float(init.forward()["loss"])
    iters = 15
    (tmp_path / "solver.prototxt").write_text(
        'net: "train.prototxt"\ntype: "Adam"\nbase_lr: 0.001\nmomentum: 0.9\nmomentum2: 0.999\n'
        'delta: 1e-8\nlr_policy: "fixed"\nmax_iter: %d\ndisplay: 1\nsnapshot_prefix: "snap"\n'
        'random_seed: 1\nsolver_mode: CPU\n' % iters)
    out = subprocess.run(["caffe", "train", "-solver", "solver.prototxt", "-weights", "init.caffemodel"],
                         cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, env=CAFFE_ENV)
    assert out.returncode == 0, out.stdout[-3000:]
    losses = [float(v) for v in re.findall(r"Iteration \d+ .*?, loss = ([-\d.e+]+)", out.stdout)]
    assert len(losses) == iters and np.isfinite(losses).all(), out.stdout[-3000:]
    trained = caffe.Net(model, caffe.TEST, weights="snap_iter_%d.caffemodel" % iters)
    loss1 = float(trained.forward()["loss"])
    assert loss1 < 0.7 * loss0, (loss0, loss1, losses)


def test_training_recipe_options_leave_the_val_and_deploy_nets_alone():
    """dropout, batch size and conv1-3's lr multiplier change only the train net (solver/profiles.py's promise)."""
    recipe = dict(dropout=0, batch_size=4, pretrained_lr_mult=1)
    for split in ("val", "deploy"):
        assert tsnet.text(tsnet.ts_fcn(split, **recipe)) == tsnet.text(tsnet.ts_fcn(split))
    train = tsnet.ts_fcn("train", **recipe)
    names = [layer.name for layer in train.layer]
    assert "drop6" not in names and "drop7" not in names
    assert "drop6" in [layer.name for layer in tsnet.ts_fcn("train").layer]
    layers = {layer.name: layer for layer in train.layer}
    assert layers["data"].hdf5_data_param.batch_size == 4
    assert [p.lr_mult for p in layers["conv1_1"].param] == [1, 2]
    assert [p.lr_mult for p in layers["fc6"].param] == [1, 2]
    assert layers["fc7"].bottom == ["fc6"]                 # relu6 is in place: fc7 reads fc6 without dropout
