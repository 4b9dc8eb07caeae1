"""WeightedMultiClassLoss (layers/weighted_loss.py) in real Caffe: gradient, Caffe's own losses, edge cases."""
import json

import numpy as np
import pytest

import caffe
from caffe import layers as L

import paper
from prototxt import net as tsnet
import weighted_loss
import dice_layer
from tools import caffe_net

caffe_net.use_device()


def _loss_net(tmp_path, shape, weights, normalize=True, extra=("infogain", "softmax")):
    """A net with Input scores/label and the Python loss, plus Caffe's InfogainLoss (H from file)
    and SoftmaxWithLoss on the same inputs."""
    n_, c, h, w = shape
    n = caffe.NetSpec()
    n.scores = L.Input(shape=dict(dim=list(shape)))
    n.label = L.Input(shape=dict(dim=[n_, 1, h, w]))
    n.loss = L.Python(n.scores, n.label, loss_weight=1, python_param=dict(
        module="weighted_loss", layer="WeightedMultiClassLoss",
        param_str=json.dumps({"weights": list(weights), "normalize": normalize})))
    norm = caffe.params.Loss.VALID if normalize else caffe.params.Loss.NONE
    if "infogain" in extra:
        h_path = str(tmp_path / "H.binaryproto")
        tsnet.write_infogain_matrix(h_path, weights)
        n.infogain = L.InfogainLoss(n.scores, n.label, loss_weight=1, infogain_loss_param=dict(
            source=h_path, axis=1), loss_param=dict(normalization=norm))
    if "softmax" in extra:
        n.softmax = L.SoftmaxWithLoss(n.scores, n.label, loss_weight=1,
                                      loss_param=dict(normalization=norm))
    proto = n.to_proto()
    proto.force_backward = True
    path = tmp_path / "loss.prototxt"
    path.write_text(str(proto))
    return caffe.Net(str(path), caffe.TRAIN)


def _random_inputs(shape, seed, scale=3.0):
    rng = np.random.RandomState(seed)
    n, c, h, w = shape
    scores = (rng.randn(*shape) * scale).astype(np.float32)
    labels = rng.randint(0, c, size=(n, 1, h, w)).astype(np.float32)
    return scores, labels


def _run(net, scores, labels, loss="loss"):
    net.blobs["scores"].data[...] = scores
    net.blobs["label"].data[...] = labels
    out = net.forward()
    for name in ("scores", "label"):
        net.blobs[name].diff[...] = 0
    net.clear_param_diffs()
    # backward from one loss at a time: the other losses' top diffs are set to 0
    for top in ("loss", "infogain", "softmax"):
        if top in net.blobs:
            net.blobs[top].diff[...] = 1.0 if top == loss else 0.0
    net._backward(len(net.layers) - 1, 0)
    return out, net.blobs["scores"].diff.copy()


@pytest.mark.parametrize("shape,weights,normalize", [
    ((1, 2, 5, 6), paper.CLASS_WEIGHTS, True),
    ((3, 2, 4, 4), paper.CLASS_WEIGHTS, False),
    ((2, 4, 3, 5), (0.1, 0.5, 1.5, 0.7), True),
])
def test_equals_caffe_infogain_value_and_gradient(tmp_path, shape, weights, normalize):
    net = _loss_net(tmp_path, shape, weights, normalize)
    scores, labels = _random_inputs(shape, seed=sum(shape))
    out, g_py = _run(net, scores, labels, "loss")
    _, g_info = _run(net, scores, labels, "infogain")
    assert np.isfinite(out["loss"]).all()
    assert abs(float(out["loss"]) - float(out["infogain"])) <= 1e-5 * max(1.0, abs(float(out["infogain"])))
    assert np.abs(g_py).max() > 1e-4  # a real gradient, not zeros
    np.testing.assert_allclose(g_py, g_info, atol=1e-5, rtol=1e-4)


def test_equals_softmax_with_loss_when_weights_are_one(tmp_path):
    shape = (2, 3, 4, 5)
    net = _loss_net(tmp_path, shape, (1.0, 1.0, 1.0), True, extra=("softmax",))
    scores, labels = _random_inputs(shape, seed=7)
    out, g_py = _run(net, scores, labels, "loss")
    _, g_sm = _run(net, scores, labels, "softmax")
    assert abs(float(out["loss"]) - float(out["softmax"])) < 1e-5
    np.testing.assert_allclose(g_py, g_sm, atol=1e-6)


def test_finite_difference_gradient_through_caffe(tmp_path):
    shape = (2, 3, 3, 4)
    weights = (0.2, 0.9, 0.5)
    net = _loss_net(tmp_path, shape, weights, True, extra=())
    scores, labels = _random_inputs(shape, seed=3, scale=1.0)
    _, grad = _run(net, scores, labels, "loss")
    rng = np.random.RandomState(0)
    eps = 1e-2
    for idx in [tuple(rng.randint(0, s) for s in shape) for _ in range(12)]:
        plus, minus = scores.copy(), scores.copy()
        plus[idx] += eps
        minus[idx] -= eps
        lp = float(_run(net, plus, labels)[0]["loss"])
        lm = float(_run(net, minus, labels)[0]["loss"])
        assert abs((lp - lm) / (2 * eps) - grad[idx]) < 2e-4, idx


def test_finite_difference_gradient_float64():
    rng = np.random.RandomState(1)
    scores = rng.randn(2, 3, 2, 3)
    labels = rng.randint(0, 3, size=(2, 1, 2, 3)).astype(np.float64)
    weights = (0.3, 1.2, 0.8)
    _, grad = weighted_loss.weighted_loss(scores, labels, weights, normalize=False)
    numeric = np.zeros_like(scores)
    eps = 1e-6
    for idx in np.ndindex(*scores.shape):
        d = np.zeros_like(scores)
        d[idx] = eps
        numeric[idx] = (weighted_loss.weighted_loss(scores + d, labels, weights, False)[0]
                        - weighted_loss.weighted_loss(scores - d, labels, weights, False)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-8)


def test_finite_at_extreme_scores(tmp_path):
    shape = (2, 2, 3, 3)
    net = _loss_net(tmp_path, shape, paper.CLASS_WEIGHTS, True, extra=())
    scores = np.zeros(shape, np.float32)
    scores[:, 0], scores[:, 1] = 1e4, -1e4      # confident background everywhere
    labels = np.ones((2, 1, 3, 3), np.float32)  # ... but the truth is tumor
    out, grad = _run(net, scores, labels)
    loss = float(out["loss"])
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert loss == pytest.approx(paper.CLASS_WEIGHTS[1] * 2e4, rel=1e-6)
    scores[:, 0], scores[:, 1] = -1e4, 1e4      # confident and right: loss 0, gradient 0
    out, grad = _run(net, scores, labels)
    assert float(out["loss"]) == 0.0 and np.abs(grad).max() == 0.0


def test_default_param_str_is_the_report(tmp_path):
    p = weighted_loss.parse_params("")
    assert p == {"weights": list(paper.CLASS_WEIGHTS), "normalize": paper.LOSS_NORMALIZE}
    with pytest.raises(ValueError, match="unknown"):
        weighted_loss.parse_params('{"weight": [1, 2]}')


def test_labels_outside_range_raise_clear_error(tmp_path):
    net = _loss_net(tmp_path, (1, 2, 3, 3), paper.CLASS_WEIGHTS, True, extra=())
    scores, labels = _random_inputs((1, 2, 3, 3), seed=0)
    labels[0, 0, 1, 1] = 2
    with pytest.raises(Exception, match=r"labels must be integers in \[0, 2\); found 2"):
        _run(net, scores, labels)
    labels[0, 0, 1, 1] = 0.5
    with pytest.raises(Exception, match="labels must be integers"):
        _run(net, scores, labels)


def test_shape_mismatch_raises_clear_error(tmp_path):
    n = caffe.NetSpec()
    n.scores = L.Input(shape=dict(dim=[1, 2, 4, 4]))
    n.label = L.Input(shape=dict(dim=[1, 1, 4, 3]))
    n.loss = L.Python(n.scores, n.label, loss_weight=1, python_param=dict(
        module="weighted_loss", layer="WeightedMultiClassLoss"))
    path = tmp_path / "bad.prototxt"
    path.write_text(str(n.to_proto()))
    with pytest.raises(Exception, match=r"labels shape \(1, 1, 4, 3\) does not match scores"):
        caffe.Net(str(path), caffe.TRAIN)


@pytest.mark.parametrize("threshold", [None, 0.96])
def test_dice_counts_in_caffe(tmp_path, threshold):
    """DiceCounts counts argmax (the default) or, with param_str {"threshold": t}, tumor probability > t."""
    n = caffe.NetSpec()
    n.score_crop = L.Input(shape=dict(dim=[2, 2, 3, 3]))
    n.label = L.Input(shape=dict(dim=[2, 1, 3, 3]))
    param = dict(module="dice_layer", layer="DiceCounts")
    if threshold is not None:
        param["param_str"] = '{"threshold": %g}' % threshold
    tops = L.Python(n.score_crop, n.label, ntop=3, propagate_down=[False, False], python_param=param)
    for name, top in zip(tsnet.DICE_TOPS, tops):
        setattr(n, name, top)
    path = tmp_path / "dice.prototxt"
    path.write_text(str(n.to_proto()))
    net = caffe.Net(str(path), caffe.TEST)
    rng = np.random.RandomState(5)
    scores = (4 * rng.randn(2, 2, 3, 3)).astype(np.float32)
    labels = rng.randint(0, 2, size=(2, 1, 3, 3)).astype(np.float32)
    net.blobs["score_crop"].data[...] = scores
    net.blobs["label"].data[...] = labels
    out = net.forward()
    margin = 0.0 if threshold is None else np.log(threshold / (1 - threshold))   # p > t <=> s1 - s0 > logit t
    pred = scores[:, 1] - scores[:, 0] > margin
    truth = labels[:, 0] == 1
    assert 0 < pred.sum() < pred.size
    assert float(out["dice_intersection"]) == (pred & truth).sum()
    assert float(out["dice_predicted"]) == pred.sum()
    assert float(out["dice_truth"]) == truth.sum()
    assert dice_layer.dice_counts(scores, labels, threshold or 0.5) == ((pred & truth).sum(), pred.sum(), truth.sum())
