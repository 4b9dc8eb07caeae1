"""tools/surgery.py in real Caffe: a small source caffemodel made here (V2 and the old V1 format of
VGG16), copied by name into the TS-FCN; clear errors for a missing layer or a shape mismatch."""
import numpy as np
import pytest

import caffe
from caffe.proto import caffe_pb2

import paper
from prototxt import net as tsnet
from tools import caffe_net, surgery

caffe_net.use_device()


def _source(tmp_path, layers=paper.PRETRAINED_LAYERS, change=None, v1=False):
    """(prototxt, caffemodel) of a source net with conv1_1 ... conv3_2 and random weights.
    change: {layer: num_output} to make a wrong shape."""
    proto = surgery.source_net_spec(layers)
    for layer in proto.layer:
        if layer.type == "Convolution":
            cp = layer.convolution_param
            cp.weight_filler.type, cp.weight_filler.std = "gaussian", 0.1
            cp.bias_filler.type, cp.bias_filler.std = "gaussian", 0.1
            if change and layer.name in change:
                cp.num_output = change[layer.name]
    prototxt = tmp_path / "src.prototxt"
    prototxt.write_text(str(proto))
    net = caffe.Net(str(prototxt), caffe.TEST)
    model = str(tmp_path / "src.caffemodel")
    net.save(model)
    if v1:  # rewrite as the old format of VGG_ILSVRC_16_layers.caffemodel: `layers`, legacy 4-D blobs
        v2 = caffe_pb2.NetParameter.FromString(open(model, "rb").read())
        old = caffe_pb2.NetParameter(name=v2.name)
        for layer in v2.layer:
            if not layer.blobs:
                continue
            v1_layer = old.layers.add(name=layer.name, type=caffe_pb2.V1LayerParameter.CONVOLUTION)
            for blob in layer.blobs:
                dims = (1,) * (4 - len(blob.shape.dim)) + tuple(blob.shape.dim)
                b = v1_layer.blobs.add(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
                b.data.extend(blob.data)
        open(model, "wb").write(old.SerializeToString())
    weights = {name: [p.data.copy() for p in net.params[name]] for name in net.params}
    return str(prototxt), model, weights


@pytest.fixture(scope="module")
def real_net():
    """The real TS-FCN deploy net, fillers seeded."""
    caffe.set_random_seed(0)
    return caffe.Net(tsnet.COMMITTED["deploy"], caffe.TEST)


@pytest.mark.parametrize("v1", [False, True])
def test_copies_by_name_rest_keeps_filler(tmp_path, real_net, v1):
    prototxt, model, weights = _source(tmp_path, v1=v1)
    fc6_before = real_net.params["fc6"][0].data[:4].copy()
    up_before = real_net.params["upscore"][0].data.copy()
    score_before = real_net.params["score"][0].data.copy()
    assert surgery.caffemodel_shapes(model, ["conv1_1"])["conv1_1"][0][-3:] == (3, 3, 3)
    copied = surgery.transplant(real_net, prototxt, model)
    assert copied == list(paper.PRETRAINED_LAYERS)
    for name in paper.PRETRAINED_LAYERS:
        for dst, src in zip(real_net.params[name], weights[name]):
            np.testing.assert_array_equal(dst.data, src)
    np.testing.assert_array_equal(real_net.params["fc6"][0].data[:4], fc6_before)
    np.testing.assert_array_equal(real_net.params["score"][0].data, score_before)
    np.testing.assert_array_equal(real_net.params["upscore"][0].data, up_before)
    assert np.abs(fc6_before).max() > 0      # an MSRA filler, not zeros


def test_missing_layer_is_a_clear_error(tmp_path, real_net):
    prototxt, model, _ = _source(tmp_path, layers=paper.PRETRAINED_LAYERS[:-1])
    before = real_net.params["conv1_1"][0].data.copy()
    with pytest.raises(surgery.SurgeryError, match="src.prototxt: no layer conv3_2"):
        surgery.transplant(real_net, prototxt, model)
    full_prototxt = str(tmp_path / "full.prototxt")
    surgery.write_source_prototxt(full_prototxt)
    with pytest.raises(surgery.SurgeryError, match="src.caffemodel: no layer conv3_2"):
        surgery.transplant(real_net, full_prototxt, model)
    np.testing.assert_array_equal(real_net.params["conv1_1"][0].data, before)  # nothing changed


def test_shape_mismatch_is_a_clear_error(tmp_path, real_net):
    prototxt, model, _ = _source(tmp_path, change={"conv2_1": 96})
    with pytest.raises(surgery.SurgeryError, match=r"layer conv2_1 has blobs \[\(96, 64, 3, 3\)"):
        surgery.transplant(real_net, prototxt, model)
    with pytest.raises(surgery.SurgeryError, match="not a Caffe caffemodel"):
        bad = tmp_path / "bad.caffemodel"
        bad.write_bytes(b"\xff" * 64)
        surgery.transplant(real_net, prototxt, str(bad))


def test_cli_writes_a_caffemodel(tmp_path):
    _, model, weights = _source(tmp_path, v1=True)
    deploy = str(tmp_path / "deploy.prototxt")
    tsnet.write(deploy, fc_channels=8)          # a narrow TS-FCN: same conv1_1 ... conv3_2
    out = tmp_path / "init.caffemodel"
    assert surgery.main(["--weights", model, "--model", deploy, "--out", str(out)]) == 0
    net = caffe.Net(deploy, caffe.TEST, weights=str(out))
    np.testing.assert_array_equal(net.params["conv3_2"][0].data, weights["conv3_2"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["deploy.prototxt", "init.caffemodel", "src.caffemodel", "src.prototxt"])
    assert surgery.main(["--weights", str(tmp_path / "nope.caffemodel"), "--model", deploy,
                         "--out", str(tmp_path / "x.caffemodel")]) == 1
    assert not (tmp_path / "x.caffemodel").exists()


def _deploy(tmp_path, name, fc_channels):
    path = str(tmp_path / (name + ".prototxt"))
    tsnet.write(path, split="deploy", fc_channels=fc_channels)
    return caffe.Net(path, caffe.TEST)


def test_widen_keeps_the_function_and_noise_breaks_the_copies(tmp_path):
    """A net with fc6/fc7 8 wide, widened to 32: the same probabilities on an image (Net2WiderNet); with noise
    the copies of a unit differ and the output moves only a little."""
    caffe.set_random_seed(3)
    narrow = _deploy(tmp_path, "narrow", 8)
    rng = np.random.RandomState(1)
    for name, blobs in narrow.params.items():        # MSRA weights from the fillers; biases and scores made larger
        if name != "upscore":
            blobs[1].data[...] = rng.normal(0, 0.1, blobs[1].data.shape)
    narrow.params["score"][0].data[...] *= 100
    image = rng.normal(0, 1, (1, 3, paper.INPUT_SIZE, paper.INPUT_SIZE)).astype(np.float32)

    def prob(net):
        net.blobs["data"].data[...] = image
        return net.forward()["prob"].copy()
    want = prob(narrow)
    assert want.std() > 0.05                                      # not a constant map: the test can fail
    wide = _deploy(tmp_path, "wide", 32)
    assert surgery.widen(wide, narrow) == ["fc6", "fc7", "score"]
    assert np.abs(prob(wide) - want).max() < 1e-4
    fc6 = wide.params["fc6"][0].data
    assert np.array_equal(fc6[8:16], fc6[:8]) and np.allclose(wide.params["fc7"][0].data[:8, :8, 0, 0] * 4,
                                                              narrow.params["fc7"][0].data[:, :, 0, 0])
    noisy = _deploy(tmp_path, "noisy", 32)
    surgery.widen(noisy, narrow, noise=0.01)
    fc6 = noisy.params["fc6"][0].data
    assert np.array_equal(fc6[:8], narrow.params["fc6"][0].data) and not np.array_equal(fc6[8:16], fc6[:8])
    assert 0 < np.abs(prob(noisy) - want).max() < 0.1 * want.std()


def test_widen_refuses_a_shape_that_is_no_multiple(tmp_path):
    narrow, odd = _deploy(tmp_path, "narrow", 8), _deploy(tmp_path, "odd", 12)
    before = odd.params["fc6"][0].data.copy()
    with pytest.raises(surgery.SurgeryError, match="fc6.*cannot be widened"):
        surgery.widen(odd, narrow)
    assert np.array_equal(odd.params["fc6"][0].data, before)     # nothing changed
