"""Net surgery: transplant the pretrained conv1_1 ... conv3_2 into the TS-FCN, by name; widen a
narrower-fc TS-FCN into the full one (`widen`).

This module owns weight transplanting (SPEC §2: layers 1-3 come from FCN-32s PASCAL or VGG16). The
source is a caffemodel plus a prototxt that Caffe can load it with; since Caffe copies weights by
layer name, a prototxt holding only conv1_1 ... conv3_2 (`write_source_prototxt`, what
tools/weights.py writes) serves for both VGG16 and FCN-32s, and so does the source's full deploy
prototxt. Every check happens before Caffe reads the weights (Caffe aborts the process on a shape
mismatch): each layer must exist in the source prototxt and in the caffemodel, with the TS-FCN's
shapes. The caffemodel is scanned without loading it whole (VGG16 is ~530 MB, in the old V1 format).
The other layers keep their fillers.

CLI:  python3 -m tools.surgery --weights fcn32s-heavy-pascal.caffemodel \
          --source-prototxt weights/conv1-3.prototxt --out weights/ts-fcn-init.caffemodel
"""
import argparse
import mmap
import os
import sys
import tempfile

import numpy as np

from google.protobuf import text_format

import caffe
from caffe import layers as L
from caffe.proto import caffe_pb2

import atomic
import paper
from prototxt import net as netdef
from tools import caffe_net

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "prototxt", "deploy.prototxt")
# Field numbers in caffe.proto: NetParameter.layer (V2) / .layers (V1); the layer's name field.
_NET_LAYER, _NET_LAYERS_V1 = 100, 2
_NAME_FIELD = {_NET_LAYER: 1, _NET_LAYERS_V1: 4}


class SurgeryError(Exception):
    """A source that cannot give the TS-FCN its pretrained layers; one clear line."""


def source_net_spec(layers=paper.PRETRAINED_LAYERS):
    """conv1_1 ... conv3_2 with VGG16's geometry (3x3, pad 1, ReLU, 2x2 max pools between blocks)."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, paper.INPUT_CHANNELS, 32, 32]))
    bottom, wanted = n.data, set(layers)
    for block, names, channels in netdef.conv_blocks():
        if block > 1:
            bottom = L.Pooling(bottom, pool=caffe.params.Pooling.MAX, kernel_size=2, stride=2)
            setattr(n, "pool%d" % (block - 1), bottom)
        for name in names:
            if name not in wanted:
                continue
            conv = L.Convolution(bottom, num_output=channels, kernel_size=3, pad=1)
            setattr(n, name, conv)
            bottom = L.ReLU(conv, in_place=True)
            setattr(n, name.replace("conv", "relu"), bottom)
    return n.to_proto()


def write_source_prototxt(path, layers=paper.PRETRAINED_LAYERS):
    """A prototxt with which Caffe loads conv1_1 ... conv3_2 of a VGG16 or FCN-32s caffemodel."""
    proto = source_net_spec(layers)
    proto.name = "VGG16 conv1_1-conv3_2 (source for tools/surgery.py)"
    atomic.write_text(path, str(proto))
    return path


def _varint(buf, pos):
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start, end):
    """(field number, wire type, value start, value end) of each field of a protobuf message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, stop = _varint(buf, pos)
        elif wire == 1:
            stop = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            stop = pos + length
        elif wire == 5:
            stop = pos + 4
        else:
            raise ValueError("wire type %d" % wire)
        if stop > end:
            raise ValueError("truncated")
        yield field, wire, pos, stop
        pos = stop


def _blob_shape(blob):
    if blob.HasField("shape"):
        return tuple(blob.shape.dim)
    return (blob.num, blob.channels, blob.height, blob.width)   # V1 (legacy 4-D) blobs


def caffemodel_shapes(path, names):
    """{layer name: [blob shapes]} for the named layers found in a caffemodel (V1 or V2 format),
    read without parsing the whole file."""
    wanted, found = set(names), {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for field, wire, start, stop in _fields(buf, 0, len(buf)):
                if field not in _NAME_FIELD or wire != 2:
                    continue
                for sub, sub_wire, s, e in _fields(buf, start, stop):
                    if sub == _NAME_FIELD[field] and sub_wire == 2:
                        name = bytes(buf[s:e]).decode("utf-8", "replace")
                        if name in wanted and name not in found:
                            cls = caffe_pb2.LayerParameter if field == _NET_LAYER \
                                else caffe_pb2.V1LayerParameter
                            layer = cls.FromString(bytes(buf[start:stop]))
                            found[name] = [_blob_shape(b) for b in layer.blobs]
                        break
    except (ValueError, IndexError) as e:
        raise SurgeryError("%s: not a Caffe caffemodel (%s)" % (path, e))
    return found


def _same(src_shape, dst_shape):
    """Caffe's Blob::ShapeEquals: a legacy 4-D shape equals a shape padded with leading 1s."""
    if len(src_shape) == 4 and len(dst_shape) < 4:
        return tuple(src_shape) == (1,) * (4 - len(dst_shape)) + tuple(dst_shape)
    return tuple(src_shape) == tuple(dst_shape)


def transplant(dst_net, src_prototxt, src_caffemodel, layers=paper.PRETRAINED_LAYERS):
    """Copy the named layers' weights and biases from the source into dst_net (a caffe.Net);
    returns the names copied. Raises SurgeryError, before changing anything, when a layer is
    missing from dst_net, the source prototxt or the caffemodel, or when a shape differs."""
    layers = list(layers)
    for path in (src_prototxt, src_caffemodel):
        if not os.path.isfile(path):
            raise SurgeryError("%s: no such file" % path)
    try:  # Caffe aborts on a prototxt it cannot parse; check it here first
        text_format.Merge(open(src_prototxt).read(), caffe_pb2.NetParameter())
    except text_format.ParseError as e:
        raise SurgeryError("%s: not a Caffe prototxt (%s)" % (src_prototxt, e))
    missing = [name for name in layers if name not in dst_net.params]
    if missing:
        raise SurgeryError("the TS-FCN has no layer %s" % ", ".join(missing))
    src_net = caffe.Net(src_prototxt, caffe.TEST)
    missing = [name for name in layers if name not in src_net.params]
    if missing:
        raise SurgeryError("%s: no layer %s" % (src_prototxt, ", ".join(missing)))
    stored = caffemodel_shapes(src_caffemodel, layers)
    missing = [name for name in layers if name not in stored]
    if missing:
        raise SurgeryError("%s: no layer %s" % (src_caffemodel, ", ".join(missing)))
    for name in layers:
        dst = [tuple(p.data.shape) for p in dst_net.params[name]]
        src = [tuple(p.data.shape) for p in src_net.params[name]]
        if len(stored[name]) != len(dst) or not all(map(_same, stored[name], dst)):
            raise SurgeryError("%s: layer %s has blobs %s; the TS-FCN needs %s"
                               % (src_caffemodel, name, stored[name], dst))
        if src != dst:
            raise SurgeryError("%s: layer %s has blobs %s; the TS-FCN needs %s"
                               % (src_prototxt, name, src, dst))
    src_net.copy_from(src_caffemodel)
    for name in layers:
        for dst_blob, src_blob in zip(dst_net.params[name], src_net.params[name]):
            dst_blob.data[...] = src_blob.data
    return layers


def widen(dst_net, src_net, noise=0.0, seed=paper.SEED):
    """Copy every parameter layer of src_net into dst_net, by name, widening layers that dst_net has wider
    (fc6 and fc7 of a net built with fewer fc channels) so that dst_net computes the same function
    (Net2WiderNet, Chen et al. 2016): output channel k of a widened layer is a copy of the source's channel
    k mod n; where a layer's input channels were widened by r, its weights are the source's divided by r
    (the r copies of each input sum to the original). `noise`: Gaussian noise, relative to each source
    weight blob's sd, added to the copies beyond the first (copies of a unit would otherwise get the same
    gradients forever; biases get none). Returns the names of the widened layers. SurgeryError, before
    changing anything, for a missing layer or a shape that is not a whole multiple of the source's."""
    plan = []
    for name, dst_blobs in dst_net.params.items():
        if name not in src_net.params:
            raise SurgeryError("the source net has no layer %s" % name)
        src_blobs = src_net.params[name]
        shapes = [(tuple(d.data.shape), tuple(s.data.shape)) for d, s in zip(dst_blobs, src_blobs)]
        for dst, src in shapes:
            if len(dst) != len(src) or any(a % b for a, b in zip(dst, src)) or dst[2:] != src[2:]:
                raise SurgeryError("layer %s: source blob %s cannot be widened to %s" % (name, src, dst))
        plan.append((name, dst_blobs, src_blobs))
    rng = np.random.RandomState(seed)
    widened = []
    for name, dst_blobs, src_blobs in plan:
        for i, (d, s) in enumerate(zip(dst_blobs, src_blobs)):
            src = s.data
            reps = tuple(a // b for a, b in zip(d.data.shape, src.shape))
            out = np.tile(src, reps)
            if i == 0 and len(reps) > 1 and reps[1] > 1:
                out /= reps[1]                       # widened inputs: the copies sum to the original
            if noise and i == 0 and reps[0] > 1:
                sd = float(src.std())
                out[src.shape[0]:] += rng.normal(0, noise * sd / (reps[1] if len(reps) > 1 else 1),
                                                 out[src.shape[0]:].shape)
            d.data[...] = out
        if any(tuple(d.data.shape) != tuple(s.data.shape) for d, s in zip(dst_blobs, src_blobs)):
            widened.append(name)
    return widened


def main(argv=None):
    ap = argparse.ArgumentParser(description="Transplant conv1_1 ... conv3_2 from a VGG16 or "
                                 "FCN-32s caffemodel into the TS-FCN (by name, shapes checked); "
                                 "the other layers keep their fillers. Writes a new caffemodel.")
    ap.add_argument("--weights", required=True, help="source caffemodel (VGG16 or FCN-32s)")
    ap.add_argument("--source-prototxt",
                    help="prototxt Caffe loads the source with (default: one written on the fly "
                         "with conv1_1 ... conv3_2 only, which fits both VGG16 and FCN-32s)")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="the TS-FCN prototxt to fill (default prototxt/deploy.prototxt; the "
                         "parameters are the same in train/val)")
    ap.add_argument("--out", required=True, help="the new caffemodel")
    ap.add_argument("--seed", type=int, default=paper.SEED, help="seed of the other layers' fillers")
    args = ap.parse_args(argv)
    caffe_net.use_device()
    caffe.set_random_seed(args.seed)
    dst = caffe.Net(args.model, caffe.TEST)
    source = args.source_prototxt
    try:
        if source is None:
            with tempfile.TemporaryDirectory() as tmp:
                copied = transplant(dst, write_source_prototxt(os.path.join(tmp, "src.prototxt")),
                                    args.weights)
        else:
            copied = transplant(dst, source, args.weights)
    except SurgeryError as e:
        print("surgery: %s" % e, file=sys.stderr)
        return 1
    with atomic.atomic_path(args.out) as tmp:
        dst.save(tmp)
    print("surgery: copied %s into %s" % (", ".join(copied), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
