"""The real Caffe nets the bench measures: FLOPs from their blobs, deterministic weights and inputs, the
train net and its solver. Choosing the device and opening a net is tools/caffe_net.py's."""
import os

import numpy as np

import paper
from tools.bench.common import DEPLOY_PROTOTXT, REPO
from tools.caffe_net import open_net, use_device

GEMM_LAYERS = ("Convolution", "Deconvolution", "InnerProduct")
DATA_LAYERS = ("Input", "HDF5Data", "Data", "ImageData", "MemoryData", "DummyData")


def read_netparam(prototxt):
    """The NetParameter of a prototxt file."""
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format
    netparam = caffe_pb2.NetParameter()
    with open(prototxt) as f:
        text_format.Merge(f.read(), netparam)
    return netparam


def lr_mults(netparam):
    """layer name -> [(lr_mult, decay_mult)] of its param blobs (Caffe's defaults 1, 1)."""
    return {l.name: [(p.lr_mult if p.HasField("lr_mult") else 1.0,
                      p.decay_mult if p.HasField("decay_mult") else 1.0) for p in l.param]
            for l in netparam.layer}


def count_flops(prototxt, caffe_net=None):
    """FLOPs per image of a prototxt, from the blob shapes of the real Caffe net.

    Per layer with a GEMM (Convolution, Deconvolution, InnerProduct): forward = 2 x MACs, where MACs =
    weight elements x output pixels (convolution) or x input pixels (deconvolution); training adds the
    weight gradient (same MACs; none for a layer with lr_mult 0) and the bottom gradient (same MACs;
    none for the layer on the data input, which Caffe does not back-propagate into). Returns
    {"layers": {name: {type, forward_gflop, train_gflop}}, "forward_gflop", "train_gflop"}.
    """
    mults = lr_mults(read_netparam(prototxt))
    net = caffe_net or open_net(prototxt)
    inputs = set(net.inputs)  # Caffe does not back-propagate into the data of input/data layers
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type in DATA_LAYERS or (layer.type == "Split" and net.bottom_names[name][0] in inputs):
            inputs.update(net.top_names[name])
    layers = {}
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type not in GEMM_LAYERS:
            continue
        weights = net.params[name][0].data
        if layer.type == "Deconvolution":
            pixels = np.prod(net.blobs[net.bottom_names[name][0]].data.shape[2:])
        elif layer.type == "Convolution":
            pixels = np.prod(net.blobs[net.top_names[name][0]].data.shape[2:])
        else:
            pixels = 1
        fwd = 2.0 * float(weights.size) * float(pixels)
        weight_grad = fwd if (mults.get(name) or [(1.0, 1.0)])[0][0] > 0 else 0.0
        bottom_grad = 0.0 if net.bottom_names[name][0] in inputs else fwd
        layers[name] = {"type": layer.type, "forward_gflop": fwd / 1e9,
                        "train_gflop": (fwd + weight_grad + bottom_grad) / 1e9}
    return {"layers": layers,
            "forward_gflop": sum(l["forward_gflop"] for l in layers.values()),
            "train_gflop": sum(l["train_gflop"] for l in layers.values())}


def fill_weights(net, seed=0):
    """Deterministic MSRA-like weights from numpy (independent of Caffe's RNG and the BLAS); the
    frozen bilinear deconvolution keeps its filler."""
    rng = np.random.RandomState(seed)
    for name in sorted(net.params):
        blobs = net.params[name]
        if name.startswith("upscore"):
            continue
        w = blobs[0].data
        fan_in = max(1, int(np.prod(w.shape[1:])))
        w[...] = rng.standard_normal(w.shape).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        for b in blobs[1:]:
            b.data[...] = 0.0


def bench_input(n, seed=1):
    """n net inputs like the crops of make data (values around the FCN means removed) and labels."""
    rng = np.random.RandomState(seed)
    x = rng.normal(0, 40, (n, paper.INPUT_CHANNELS, paper.INPUT_SIZE, paper.INPUT_SIZE)).astype(np.float32)
    y = np.zeros((n, 1, paper.INPUT_SIZE, paper.INPUT_SIZE), np.float32)
    for i in range(n):
        r, c = rng.randint(30, 50, 2)
        y[i, 0, r:r + 25, c:c + 25] = 1
        x[i, :, r:r + 25, c:c + 25] += 60
    return x, y


def train_net_files(tmp, loss, fc_channels, images=1, **solver_fields):
    """A train prototxt of the real TS-FCN reading a tiny HDF5 file (absolute paths), and its solver (the
    `paper` profile; solver_fields override SolverParameter fields, e.g. type="SGD", weight_decay=0).
    One image: the HDF5 layer's shuffle (std::rand, not Caffe's seeded RNG) then cannot change what
    a seeded run computes."""
    import h5py
    from prototxt import net
    from solver import make_solver
    h5 = os.path.join(tmp, "bench_train.h5")
    if not os.path.exists(h5):
        x, y = bench_input(images)
        with h5py.File(h5, "w") as f:
            f["data"], f["label"] = x, y
        with open(os.path.join(tmp, "bench_train.txt"), "w") as f:
            f.write(h5 + "\n")
    proto = os.path.join(tmp, "train_%s%s.prototxt" % (loss, "_fc%d" % fc_channels if fc_channels else ""))
    net.write(proto, split="train", loss=loss, train_source=os.path.join(tmp, "bench_train.txt"),
              fc_channels=fc_channels)
    sp = make_solver.solver_parameter(proto, 20000, os.path.join(tmp, "snap"), profile="paper",
                                      gpu=False, max_iter=10 ** 7)
    for key, value in solver_fields.items():
        setattr(sp, key, value)
    tag = "".join("_%s%s" % (k, v) for k, v in sorted(solver_fields.items())) + ("_fc%d" % fc_channels if fc_channels else "")
    solver_path = os.path.join(tmp, "solver_%s%s.prototxt" % (loss, tag))
    make_solver.write(solver_path, sp)
    return proto, solver_path


def make_solver(ctx, loss="python", fill=True, fc_channels=None, **solver_fields):
    """A seeded pycaffe solver of the train net with deterministic weights (fill=False: Caffe's fillers;
    enough for timing the update), see train_net_files; fc_channels: fc6/fc7 width (default the run's)."""
    import caffe
    _, solver_path = train_net_files(ctx.tmp, loss, fc_channels or ctx.fc_channels, **solver_fields)
    use_device(ctx.gpu)
    caffe.set_random_seed(paper.SEED)
    solver = caffe.get_solver(solver_path)
    if fill:
        fill_weights(solver.net)
    return solver


def deploy_net(ctx):
    """(prototxt path, net): the committed deploy net (the --quick net: fc6/fc7 narrowed), filled weights."""
    if ctx.fc_channels is None:
        path = DEPLOY_PROTOTXT
    else:
        from prototxt import net
        path = os.path.join(ctx.tmp, "deploy_quick.prototxt")
        if not os.path.exists(path):
            net.write(path, split="deploy", fc_channels=ctx.fc_channels)
    n = open_net(path, gpu=ctx.gpu)
    fill_weights(n)
    return path, n


def relpath(path):
    """A path for the results: relative to the checkout when inside it, else its file name."""
    return os.path.relpath(path, REPO) if path.startswith(REPO) else os.path.basename(path)
