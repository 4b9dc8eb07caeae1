"""The TS-FCN of the report (SPEC §2-§3) as one caffe.NetSpec source.

This module owns the network definition: `ts_fcn(split, ...)` builds the train, val or deploy
NetParameter; `python3 -m prototxt.net` regenerates the committed prototxt/{train,val,deploy}.prototxt
and `--check` fails when they differ from a regeneration. Layer names follow VGG16 (conv1_1 ...
conv3_2, fc6, fc7) so pretrained weights transplant by name (tools/surgery.py).

Options (SPEC §7): crop_mode "center" (the report's offset 14) or "aligned" (the offset that
caffe.coord_map derives for this net); loss "python" (layers/weighted_loss.py) or "infogain"
(Caffe's C++ InfogainLoss with H = diag(class weights), read from a binaryproto file; used as a
cross-check and by the bench); normalize True (divide by the pixel count) or False (plain sum).
"""
import argparse
import difflib
import json
import os
import sys

import numpy as np

import caffe
from caffe import coord_map
from caffe import layers as L
from caffe import params as P
from google.protobuf import text_format

import atomic
import paper

SPLITS = ("train", "val", "deploy")
LOSSES = ("python", "infogain")
HERE = os.path.dirname(os.path.abspath(__file__))
COMMITTED = {split: os.path.join(HERE, split + ".prototxt") for split in SPLITS}
LOSS_MODULE, LOSS_LAYER = "weighted_loss", "WeightedMultiClassLoss"
DICE_MODULE, DICE_LAYER = "dice_layer", "DiceCounts"
DICE_TOPS = ("dice_intersection", "dice_predicted", "dice_truth")
INFOGAIN_DEFAULT_SOURCE = "infogain_H.binaryproto"

_FROZEN_PARAM = [dict(lr_mult=0, decay_mult=0)]


def _lr_params(lr_mult):
    """Learning-rate multipliers (weights, bias: twice the rate); biases never decay."""
    return [dict(lr_mult=lr_mult, decay_mult=1), dict(lr_mult=2 * lr_mult, decay_mult=0)]


def _conv(bottom, name, nout, ks, pad, weight_filler, pretrained_lr_mult=paper.PRETRAINED_LR_MULT):
    lr = _lr_params(pretrained_lr_mult if name in paper.PRETRAINED_LAYERS else 1)
    return L.Convolution(bottom, name=name, num_output=nout, kernel_size=ks, stride=1, pad=pad,
                         param=lr, weight_filler=weight_filler,
                         bias_filler=dict(type="constant", value=0))


def _conv_relu(n, bottom, name, nout, ks=3, pad=1, weight_filler=None, pretrained_lr_mult=paper.PRETRAINED_LR_MULT):
    # MSRA fits ReLU nets trained from scratch (SPEC §7 "from scratch (MSRA)").
    filler = weight_filler or dict(type="msra")
    top = _conv(bottom, name, nout, ks, pad, filler, pretrained_lr_mult)
    setattr(n, name, top)
    relu = L.ReLU(top, in_place=True)
    setattr(n, name.replace("conv", "relu"), relu)
    return relu


def conv_blocks():
    """(block, layer names, channels) of the VGG16 blocks the TS-FCN keeps (paper.CONV_BLOCKS): conv1_1 ... conv3_2,
    each block followed by a 2x2 max pool. The one layout of them: the net here, the transplant source
    (tools/surgery.py)."""
    for block, (channels, convs) in enumerate(paper.CONV_BLOCKS, start=1):
        yield block, ["conv%d_%d" % (block, i) for i in range(1, convs + 1)], channels


def _body(n, fc_channels=None, dropout=paper.DROPOUT_RATIO, pretrained_lr_mult=paper.PRETRAINED_LR_MULT):
    """conv1_1 ... score, upscore on n.data (SPEC §2 rows 1-7, before the crop); dropout 0 leaves drop6
    and drop7 out (they only act in training); pretrained_lr_mult: the lr multiplier of conv1_1..conv3_2."""
    fc6_channels = fc_channels or paper.FC6_CHANNELS
    fc7_channels = fc_channels or paper.FC7_CHANNELS
    bottom = n.data
    for block, names, channels in conv_blocks():
        for name in names:
            pad = paper.CONV1_1_PAD if name == "conv1_1" else 1
            bottom = _conv_relu(n, bottom, name, channels, pad=pad, pretrained_lr_mult=pretrained_lr_mult)
        pool = L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=2, stride=2)
        setattr(n, "pool%d" % block, pool)
        bottom = pool
    n.fc6 = _conv(bottom, "fc6", fc6_channels, paper.FC6_KERNEL, 0, dict(type="msra"))
    top = n.relu6 = L.ReLU(n.fc6, in_place=True)
    if dropout:
        top = n.drop6 = L.Dropout(top, dropout_ratio=dropout, in_place=True)
    n.fc7 = _conv(top, "fc7", fc7_channels, 1, 0, dict(type="msra"))
    top = n.relu7 = L.ReLU(n.fc7, in_place=True)
    if dropout:
        top = n.drop7 = L.Dropout(top, dropout_ratio=dropout, in_place=True)
    n.score = _conv(top, "score", paper.NUM_CLASSES, 1, 0, dict(type="gaussian", std=0.01))
    # Fixed bilinear upsampling, one filter per class (group = classes: the classes never mix).
    n.upscore = L.Deconvolution(n.score, param=_FROZEN_PARAM, convolution_param=dict(
        num_output=paper.NUM_CLASSES, group=paper.NUM_CLASSES, kernel_size=paper.UPSCORE_KERNEL,
        stride=paper.UPSCORE_STRIDE, bias_term=False, weight_filler=dict(type="bilinear")))


def _input_spec():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, paper.INPUT_CHANNELS, paper.INPUT_SIZE, paper.INPUT_SIZE]))
    return n


def crop_offset(crop_mode=paper.DEFAULT_CROP_MODE):
    """The spatial offset of the score_crop layer: 14 for "center" (the report), or, for
    "aligned", the offset caffe.coord_map derives between upscore and data for this net."""
    if crop_mode == "center":
        return paper.CROP_OFFSET_CENTER
    if crop_mode != "aligned":
        raise ValueError("crop_mode must be one of %s, not %r" % (paper.CROP_MODES, crop_mode))
    n = _input_spec()
    _body(n)
    axis, scale, shift = coord_map.coord_map_from_to(n.upscore, n.data)
    if not (np.all(scale == 1) and np.all(shift <= 0) and np.all(np.round(shift) == shift)):
        raise RuntimeError("coord_map gives no integer crop (scale %s, shift %s)" % (scale, shift))
    offsets = {int(-v) for v in np.ravel(shift)}
    assert len(offsets) == 1, offsets
    return offsets.pop()


def _loss_layer(n, loss, class_weights, normalize, infogain_source):
    if loss == "python":
        param_str = json.dumps({"weights": [float(w) for w in class_weights],
                                "normalize": bool(normalize)})
        return L.Python(n.score_crop, n.label, loss_weight=1, python_param=dict(
            module=LOSS_MODULE, layer=LOSS_LAYER, param_str=param_str))
    if loss == "infogain":
        norm = P.Loss.VALID if normalize else P.Loss.NONE
        return L.InfogainLoss(n.score_crop, n.label, loss_weight=1,
                              infogain_loss_param=dict(source=infogain_source, axis=1),
                              loss_param=dict(normalization=norm))
    raise ValueError("loss must be one of %s, not %r" % (LOSSES, loss))


def ts_fcn(split, crop_mode=paper.DEFAULT_CROP_MODE, loss="python", class_weights=paper.CLASS_WEIGHTS,
           normalize=paper.LOSS_NORMALIZE, train_source="train.txt", val_source="val.txt",
           batch_size=paper.BATCH_SIZE, infogain_source=INFOGAIN_DEFAULT_SOURCE, fc_channels=None,
           dropout=paper.DROPOUT_RATIO, pretrained_lr_mult=paper.PRETRAINED_LR_MULT, tumor_threshold=None):
    """The TS-FCN NetParameter for split "train", "val" or "deploy".

    batch_size, dropout (the training-time ratio of drop6/drop7, 0: left out) and pretrained_lr_mult (the lr
    multiplier of conv1_1..conv3_2; the report's 0.1 suits transplanted weights, a net trained from scratch
    may learn them at full rate) shape the train net only (val takes batch 1); the val and deploy nets
    always have the report's layers, so every training recipe gives the same deploy net. tumor_threshold:
    the val net's DiceCounts calls tumor above this probability (tools/score.py; None: argmax).

    infogain_source: H = diag(class_weights) as a binaryproto (loss="infogain" only; a relative
    path is resolved by Caffe from its working directory; `write` writes it and uses its absolute
    path). fc_channels: width of fc6/fc7 (default the report's 4096); only tests and quick
    experiments use a narrower net, built the same way.
    """
    if split not in SPLITS:
        raise ValueError("split must be one of %s, not %r" % (SPLITS, split))
    if len(class_weights) != paper.NUM_CLASSES:
        raise ValueError("need %d class weights, got %r" % (paper.NUM_CLASSES, class_weights))
    offset = crop_offset(crop_mode)
    if split == "deploy":
        n = _input_spec()
    else:
        source = train_source if split == "train" else val_source
        n = caffe.NetSpec()
        n.data, n.label = L.HDF5Data(ntop=2, hdf5_data_param=dict(
            source=source, batch_size=batch_size if split == "train" else paper.BATCH_SIZE,
            shuffle=(split == "train")))
    if split == "train":
        _body(n, fc_channels, dropout, pretrained_lr_mult)
    else:
        _body(n, fc_channels)
    n.score_crop = L.Crop(n.upscore, n.data, crop_param=dict(axis=2, offset=offset))
    if split in ("train", "val"):
        n.loss = _loss_layer(n, loss, class_weights, normalize, infogain_source)
    if split in ("val", "deploy"):
        n.prob = L.Softmax(n.score_crop)
    if split == "val":
        # prob stays readable from pycaffe, but is no net output: `caffe test` would print every
        # one of its 20 000 values per iteration.
        n.silence_prob = L.Silence(n.prob, ntop=0)
        dice_param = dict(module=DICE_MODULE, layer=DICE_LAYER)
        if tumor_threshold is not None:
            dice_param["param_str"] = json.dumps({"threshold": float(tumor_threshold)})
        tops = L.Python(n.score_crop, n.label, name="dice", ntop=len(DICE_TOPS),
                        propagate_down=[False, False], python_param=dice_param)
        for name, top in zip(DICE_TOPS, tops):
            setattr(n, name, top)
    proto = n.to_proto()
    proto.name = "TS-FCN"
    return proto


def infogain_matrix(class_weights=paper.CLASS_WEIGHTS):
    """H = diag(class_weights) as a Caffe BlobProto of shape 1x1xCxC."""
    c = len(class_weights)
    h = np.diag(np.asarray(class_weights, dtype=np.float32)).reshape(1, 1, c, c)
    return caffe.io.array_to_blobproto(h)


def write_infogain_matrix(path, class_weights=paper.CLASS_WEIGHTS):
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(infogain_matrix(class_weights).SerializeToString())
    return path


def text(proto):
    # '.7g' prints the decimal values given here (0.1, not 0.10000000149011612).
    return ("# Generated by prototxt/net.py; edit that file, not this one.\n"
            + text_format.MessageToString(proto, float_format=".7g"))


def write(path, split=None, **kw):
    """Write ts_fcn(split, **kw) to path (split defaults to the file name: train/val/deploy).
    With loss="infogain", H is written beside it as <name>.infogain.binaryproto and referenced by
    absolute path, so Caffe finds it from any working directory."""
    if split is None:
        split = os.path.splitext(os.path.basename(path))[0]
    if kw.get("loss") == "infogain" and split != "deploy" and "infogain_source" not in kw:
        h_path = os.path.abspath(os.path.splitext(path)[0] + ".infogain.binaryproto")
        write_infogain_matrix(h_path, kw.get("class_weights", paper.CLASS_WEIGHTS))
        kw["infogain_source"] = h_path
    atomic.write_text(path, text(ts_fcn(split, **kw)))
    return path


def check():
    """Names of the committed prototxts that differ from a regeneration (printing a diff)."""
    stale = []
    for split, path in COMMITTED.items():
        want = text(ts_fcn(split))
        have = open(path).read() if os.path.exists(path) else ""
        if have != want:
            stale.append(path)
            sys.stdout.writelines(difflib.unified_diff(
                have.splitlines(True), want.splitlines(True), path, "regenerated"))
    return stale


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Without options, "
                                 "regenerates prototxt/{train,val,deploy}.prototxt.")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 when a committed prototxt differs from a regeneration")
    ap.add_argument("--out", help="write one variant to this path instead (with --split etc.)")
    ap.add_argument("--split", choices=SPLITS, help="with --out (default: from the file name)")
    ap.add_argument("--crop-mode", choices=paper.CROP_MODES, default=paper.DEFAULT_CROP_MODE)
    ap.add_argument("--loss", choices=LOSSES, default="python")
    ap.add_argument("--no-normalize", action="store_true", help="plain sum instead of the pixel mean")
    ap.add_argument("--train-source", default="train.txt")
    ap.add_argument("--val-source", default="val.txt")
    args = ap.parse_args(argv)
    if args.check:
        stale = check()
        if stale:
            print("stale: %s; run `make prototxt`" % ", ".join(stale), file=sys.stderr)
            return 1
        print("prototxt: the committed files match prototxt/net.py")
        return 0
    if args.out:
        write(args.out, split=args.split, crop_mode=args.crop_mode, loss=args.loss,
              normalize=not args.no_normalize, train_source=args.train_source,
              val_source=args.val_source)
        print(args.out)
        return 0
    for split, path in COMMITTED.items():
        atomic.write_text(path, text(ts_fcn(split)))
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
