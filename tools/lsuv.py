"""Data-dependent initialisation for training TS-FCN from scratch (layer-sequential unit variance).

The report fine-tunes conv1-3 from VGG16/FCN, whose weights expect the FCN input scale (0..255 minus
the channel means, values of +-50 and more). MSRA fillers preserve that scale through the net, so a
net started from scratch emits scores of +-30: the softmax saturates, the first losses are ~9 and
Adam's first steps thrash. LSUV (Mishkin & Matas, ICLR 2016) rescales each layer's weights in turn,
on real training batches, so that its output has unit standard deviation; the architecture and the
fillers' shapes stay as they are, only the scale changes. It runs once, before the first iteration of
a from-scratch run (tools/train.py), never after a transplant or on resume.
"""
import numpy as np

import paper

# Learned layers in forward order; upscore is the fixed bilinear interpolation and stays as it is.
LAYERS = tuple("conv%d_%d" % (b + 1, i + 1) for b, (_, n) in enumerate(paper.CONV_BLOCKS)
               for i in range(n)) + ("fc6", "fc7", "score")


def layer_std(net, name, batches):
    """Standard deviation of layer `name`'s output (its top, before the in-place ReLU) over `batches`
    forward passes of the net's own data layer."""
    top = net.top_names[name][0]
    values = []
    for _ in range(batches):
        net.forward(end=name)
        values.append(np.asarray(net.blobs[top].data, dtype=np.float64).ravel())
    return float(np.concatenate(values).std())


def unit_variance(net, layers=LAYERS, batches=4, target=1.0, tolerance=0.05, max_rounds=4):
    """Scale each layer's weights (and zero its bias) until its output std is `target`.
    Returns {layer: std before scaling}, for the log."""
    before = {}
    for name in layers:
        weights = net.params[name]
        if len(weights) > 1:
            weights[1].data[...] = 0
        for round_ in range(max_rounds):
            std = layer_std(net, name, batches)
            if round_ == 0:
                before[name] = std
            if std <= 0 or abs(std - target) <= tolerance * target:
                break
            weights[0].data[...] *= target / std
    return before
