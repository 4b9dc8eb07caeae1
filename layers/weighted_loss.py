"""The report's weighted multiclass loss (SPEC §3) as a Caffe Python layer.

This module owns WeightedMultiClassLoss:

    loss = sum over pixels i of w[y_i] * (-log softmax(f_i)[y_i])   [/ (N*H*W) when normalising]

bottom[0]: scores N x C x H x W (raw, before softmax); bottom[1]: labels N x 1 x H x W with integer
values in [0, C); top[0]: the scalar loss. Use it with `loss_weight: 1` (Caffe gives Python layers
no loss weight by default). param_str is JSON, e.g. {"weights": [0.04, 0.96], "normalize": true};
missing keys take the report's values (paper.CLASS_WEIGHTS, paper.LOSS_NORMALIZE).

The log-softmax is computed stably (shifted by the per-pixel maximum, in float64), so the loss stays
finite for scores of +-1e4, where log(float32 softmax) would be -inf. The backward pass is exact:
d loss / d f_k = w[y] * (softmax(f)_k - [k == y]) (/ N*H*W). Caffe's InfogainLoss with
H = diag(weights) computes the same value in C++ (tests/test_weighted_loss.py checks it).
"""
import json

import numpy as np

import caffe

import paper


def log_softmax(scores, axis=1):
    """Stable log-softmax in float64."""
    s = np.asarray(scores, dtype=np.float64)
    shifted = s - s.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def weighted_loss(scores, labels, weights, normalize=True):
    """(loss, d loss / d scores) for scores N x C x H x W and labels N x 1 x H x W, in float64."""
    logp = log_softmax(scores)
    y = np.asarray(labels).astype(np.int64)                    # N x 1 x H x W
    w = np.asarray(weights, dtype=np.float64)[y[:, 0]]         # N x H x W
    picked = np.take_along_axis(logp, y, axis=1)[:, 0]         # N x H x W
    count = float(y.size) if normalize else 1.0
    loss = -(w * picked).sum() / count
    grad = np.exp(logp)
    onehot = np.zeros_like(grad)
    np.put_along_axis(onehot, y, 1.0, axis=1)
    grad = (grad - onehot) * w[:, None] / count
    return loss, grad


def check_labels(labels, num_classes, where="WeightedMultiClassLoss"):
    """Raise ValueError unless every label is an integer in [0, num_classes)."""
    lab = np.asarray(labels)
    bad = (lab < 0) | (lab >= num_classes) | (lab != np.round(lab))
    if bad.any():
        values = np.unique(lab[bad])[:5]
        raise ValueError("%s: labels must be integers in [0, %d); found %s (%d pixels)"
                         % (where, num_classes, ", ".join("%g" % v for v in values), int(bad.sum())))


def parse_params(param_str):
    """{"weights": [...], "normalize": bool} from the layer's JSON param_str, with the defaults."""
    try:
        params = json.loads(param_str) if param_str and param_str.strip() else {}
    except ValueError as e:
        raise ValueError("WeightedMultiClassLoss: param_str is not JSON (%s): %r" % (e, param_str))
    unknown = set(params) - {"weights", "normalize"}
    if unknown:
        raise ValueError("WeightedMultiClassLoss: unknown param_str keys %s" % sorted(unknown))
    weights = [float(w) for w in params.get("weights", paper.CLASS_WEIGHTS)]
    return {"weights": weights, "normalize": bool(params.get("normalize", paper.LOSS_NORMALIZE))}


class WeightedMultiClassLoss(caffe.Layer):
    """Class-weighted softmax cross-entropy (see the module docstring)."""

    def setup(self, bottom, top):
        if len(bottom) != 2 or len(top) != 1:
            raise ValueError("WeightedMultiClassLoss needs 2 bottoms (scores, labels) and 1 top, "
                             "got %d and %d" % (len(bottom), len(top)))
        params = parse_params(self.param_str)
        self.weights = np.asarray(params["weights"], dtype=np.float64)
        self.normalize = params["normalize"]
        self.grad = None

    def reshape(self, bottom, top):
        scores, labels = bottom[0].data.shape, bottom[1].data.shape
        if len(scores) < 2:
            raise ValueError("WeightedMultiClassLoss: scores must be N x C x H x W, got %s"
                             % (scores,))
        want = (scores[0], 1) + tuple(scores[2:])
        if tuple(labels) != want:
            raise ValueError("WeightedMultiClassLoss: labels shape %s does not match scores %s "
                             "(need %s)" % (tuple(labels), tuple(scores), want))
        if len(self.weights) != scores[1]:
            raise ValueError("WeightedMultiClassLoss: %d class weights for %d classes"
                             % (len(self.weights), scores[1]))
        check_labels(bottom[1].data, scores[1])
        top[0].reshape(1)

    def forward(self, bottom, top):
        loss, self.grad = weighted_loss(bottom[0].data, bottom[1].data, self.weights,
                                        self.normalize)
        top[0].data[...] = loss

    def backward(self, top, propagate_down, bottom):
        # Labels get no gradient (force_backward may still ask for one; like Caffe's own loss
        # layers, which refuse it, the labels' diff is left alone).
        if propagate_down[0]:
            bottom[0].diff[...] = self.grad * top[0].diff[0]
