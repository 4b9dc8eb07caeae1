"""The PyTorch peer (run by tools/bench/peer_host.py with PyTorch on its path; never imported by the toolkit):
the net that tools/bench/peer.py exported from Caffe, built layer by layer in PyTorch on the CPU with the
same shapes (checked against Caffe's blobs), weights and input; the report's weighted loss; Adam with
Caffe's settings per parameter (lr and decay multipliers, frozen layers). Times a training iteration
(zero_grad, forward, loss, backward, Adam step) and the forward alone, on the threads Caffe used.

    python3 -m tools.bench.peer_torch --dir bench/peer.tmp     writes DIR/result.json
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

SPEC, ARRAYS, RESULT = "spec.json", "arrays.npz", "result.json"


class PeerNet:
    """The exported layers as a PyTorch computation: blobs by name, as Caffe runs them."""

    def __init__(self, spec, arrays):
        self.layers = spec["layers"]
        self.shapes = spec["blob_shapes"]
        self.params = {}      # layer name -> [tensor]
        self.groups = []      # Adam parameter groups
        s = spec["solver"]
        for layer in self.layers:
            tensors = []
            for p in layer.get("params", []):
                t = torch.from_numpy(np.array(arrays[p["key"]], dtype=np.float32))
                t.requires_grad_(p["lr_mult"] > 0)
                tensors.append(t)
                if p["lr_mult"] > 0:
                    self.groups.append({"params": [t], "lr": s["base_lr"] * p["lr_mult"],
                                        "weight_decay": s["weight_decay"] * p["decay_mult"]})
            self.params[layer["name"]] = tensors
        self.inputs = {k.split("/", 1)[1]: torch.from_numpy(np.array(arrays[k])) for k in arrays.files
                       if k.startswith("input/")}

    def forward(self, training, with_loss=True, check=False):
        blobs = dict(self.inputs)
        for layer in self.layers:
            kind, name = layer["type"], layer["name"]
            if kind == "HDF5Data":
                continue
            if kind == "Python" and not with_loss:
                break
            b = [blobs[n] for n in layer["bottom"]]
            w = self.params.get(name) or []
            if kind == "Convolution":
                out = F.conv2d(b[0], w[0], w[1] if len(w) > 1 else None, layer["stride"], layer["pad"],
                               1, layer["group"])
            elif kind == "Deconvolution":
                out = F.conv_transpose2d(b[0], w[0], w[1] if len(w) > 1 else None, layer["stride"],
                                         layer["pad"], 0, layer["group"])
            elif kind == "ReLU":
                out = F.leaky_relu(b[0], layer["negative_slope"]) if layer["negative_slope"] else F.relu(b[0])
            elif kind == "Pooling":   # Caffe rounds the output size up
                out = F.max_pool2d(b[0], layer["kernel"], layer["stride"], layer["pad"], ceil_mode=True)
            elif kind == "Dropout":
                out = F.dropout(b[0], layer["ratio"], training)
            elif kind == "Crop":
                out = b[0]
                ref = b[1].shape
                for axis in range(layer["axis"], out.dim()):
                    offs = layer["offset"]
                    off = offs[0] if len(offs) == 1 else (offs[axis - layer["axis"]] if offs else 0)
                    out = out.narrow(axis, off, ref[axis])
            elif kind == "Python":   # layers/weighted_loss.py: class-weighted softmax cross-entropy
                labels = b[1][:, 0].long()
                weight = torch.tensor(layer["weights"], dtype=b[0].dtype)
                out = F.cross_entropy(b[0], labels, weight=weight, reduction="sum")
                if layer["normalize"]:
                    out = out / labels.numel()
            else:
                raise ValueError("no PyTorch version of layer type %s" % kind)
            top = layer["top"][0]
            if check and kind != "Python" and list(out.shape) != self.shapes[top]:
                raise ValueError("layer %s: PyTorch gives %s, Caffe %s" % (name, list(out.shape), self.shapes[top]))
            blobs[top] = out
        return blobs


def median_of_runs(fn, repeat, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def run(folder):
    with open(os.path.join(folder, SPEC)) as f:
        spec = json.load(f)
    arrays = np.load(os.path.join(folder, ARRAYS))
    torch.set_num_threads(int(spec["threads"]))
    net = PeerNet(spec, arrays)
    loss_blob = spec["loss_blob"]
    with torch.no_grad():   # the same net: Caffe's TEST-phase loss (no dropout) on the same weights and input
        loss = float(net.forward(training=False, check=True)[loss_blob])
    ref = spec["caffe_test_loss"]
    s = spec["solver"]
    if s["type"] != "Adam":
        raise ValueError("the peer implements Caffe's Adam only, not %s" % s["type"])
    opt = torch.optim.Adam(net.groups, betas=(s["momentum"], s["momentum2"]), eps=s["delta"])

    def step():
        opt.zero_grad()
        net.forward(training=True)[loss_blob].backward()
        opt.step()

    def forward():
        with torch.inference_mode():
            net.forward(training=False, with_loss=False)

    train_s, train_runs = median_of_runs(step, spec["repeat"], spec["warmup"])
    fwd_s, fwd_runs = median_of_runs(forward, spec["repeat"], spec["warmup"])
    return {"status": "ok", "kind": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "backend": "oneDNN" if torch.backends.mkldnn.is_available() else "native",
            "train_iter_s": train_s, "train_iter_s_runs": train_runs, "forward_s": fwd_s, "forward_s_runs": fwd_runs,
            "loss": loss, "caffe_loss": ref, "loss_rel_diff": abs(loss - ref) / max(abs(ref), 1e-12),
            "loadavg": os.getloadavg()[0], "quick": spec.get("quick", False)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="the folder tools/bench/peer.py exported into")
    args = ap.parse_args(argv)
    result = run(args.dir)
    tmp = os.path.join(args.dir, RESULT + ".partial")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(args.dir, RESULT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
