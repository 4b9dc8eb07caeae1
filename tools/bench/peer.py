"""The PyTorch peer, Caffe's side: the real train net (the layers of the prototxt that `make train` writes,
the blob and parameter shapes of the caffe.Net built from it, lr/decay multipliers, the Python loss's
class weights, the solver's Adam settings), deterministic weights and the input, exported into a folder
for tools/bench/peer_torch.py. Nothing is retyped: a change of the net changes what the peer builds.

Also the Caffe loss of that input in TEST phase (no dropout), which the peer must reproduce with the same
weights: the check that it is the same net.
"""
import json
import os
import shutil

import numpy as np

import atomic
from tools import caffe_net
from tools.bench import nets
from tools.bench.common import NotAvailable, threads

SPEC, ARRAYS = "spec.json", "arrays.npz"
SUPPORTED = ("HDF5Data", "Convolution", "Deconvolution", "ReLU", "Pooling", "Dropout", "Crop", "Python")


def _layer_spec(layer):
    """The settings of one LayerParameter that the peer needs (by type)."""
    from layers import weighted_loss
    from prototxt import net as net_def
    spec = {"name": layer.name, "type": layer.type, "bottom": list(layer.bottom), "top": list(layer.top)}
    if layer.type not in SUPPORTED:
        raise NotAvailable("the peer has no PyTorch version of Caffe layer type %s (%s)" % (layer.type, layer.name))
    if layer.type in ("Convolution", "Deconvolution"):
        cp = layer.convolution_param
        spec.update(num_output=cp.num_output, kernel=cp.kernel_size[0] if cp.kernel_size else cp.kernel_h,
                    stride=cp.stride[0] if cp.stride else 1, pad=cp.pad[0] if cp.pad else 0, group=cp.group,
                    bias_term=cp.bias_term)
    elif layer.type == "Pooling":
        pp = layer.pooling_param
        if pp.pool != pp.MAX:
            raise NotAvailable("the peer has max pooling only (%s)" % layer.name)
        spec.update(kernel=pp.kernel_size, stride=pp.stride, pad=pp.pad)
    elif layer.type == "ReLU":
        spec.update(negative_slope=layer.relu_param.negative_slope)
    elif layer.type == "Dropout":
        spec.update(ratio=layer.dropout_param.dropout_ratio)
    elif layer.type == "Crop":
        spec.update(axis=layer.crop_param.axis, offset=list(layer.crop_param.offset))
    elif layer.type == "Python":
        pp = layer.python_param
        if (pp.module, pp.layer) != (net_def.LOSS_MODULE, net_def.LOSS_LAYER):
            raise NotAvailable("the peer has no PyTorch version of Python layer %s.%s" % (pp.module, pp.layer))
        spec.update(weighted_loss.parse_params(pp.param_str))
    return spec


def export(ctx, folder, kind="torch"):
    """Write folder/spec.json and folder/arrays.npz for the peer; returns the results' "peer" entry."""
    from solver import make_solver as solver_io
    prototxt, solver_path = nets.train_net_files(ctx.tmp, "python", ctx.fc_channels)
    netparam = nets.read_netparam(prototxt)
    net = caffe_net.open_net(prototxt)      # TEST phase: dropout off, for the loss check
    nets.fill_weights(net)
    net.forward()
    mults = nets.lr_mults(netparam)
    layers, arrays = [], {}
    for layer in netparam.layer:
        spec = _layer_spec(layer)
        if layer.name in net.params:
            spec["params"] = []
            for i, blob in enumerate(net.params[layer.name]):
                lr, decay = mults[layer.name][i] if i < len(mults[layer.name]) else (1.0, 1.0)
                key = "%s/%d" % (layer.name, i)
                arrays[key] = blob.data.copy()
                spec["params"].append({"key": key, "shape": list(blob.data.shape), "lr_mult": lr, "decay_mult": decay})
        layers.append(spec)
    losses = [l["top"][0] for l in layers if l["type"] == "Python"]
    inputs = [l for l in layers if l["type"] == "HDF5Data"]
    if len(losses) != 1 or len(inputs) != 1:
        raise NotAvailable("the peer needs one HDF5 data layer and one loss layer")
    for top in inputs[0]["top"]:
        arrays["input/" + top] = net.blobs[top].data.copy()
    sp = solver_io.read(solver_path)
    spec = {"kind": kind, "net": netparam.name, "layers": layers,
            "blob_shapes": {name: list(b.data.shape) for name, b in net.blobs.items()},
            "solver": {"type": sp.type, "base_lr": sp.base_lr, "momentum": sp.momentum, "momentum2": sp.momentum2,
                       "delta": sp.delta, "weight_decay": sp.weight_decay},
            "loss_blob": losses[0], "caffe_test_loss": float(net.blobs[losses[0]].data),
            "threads": threads(), "repeat": ctx.repeat, "warmup": ctx.warmup,
            "quick": ctx.quick}
    del net
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    with atomic.atomic_path(os.path.join(folder, ARRAYS)) as p:
        with open(p, "wb") as f:
            np.savez(f, **arrays)
    atomic.write_text(os.path.join(folder, SPEC), json.dumps(spec, indent=1))
    return {"status": "exported", "kind": kind, "dir": folder}
