"""GPU proof of the CUDA Caffe build: the checks tools/cuda/gpu-proof.sh runs on a GPU.

(a) cpu-vs-gpu: a small conv net without dropout, same seed and data, trained on the CPU and on the GPU:
    the loss curves must agree (float32; different BLAS, so to ~1e-4, not bit for bit).
(b) loss-layers: TS-FCN on the GPU with the Python loss (layers/weighted_loss.py) and with InfogainLoss,
    same seed (same initial weights, same dropout masks): the loss curves must agree.
Data are synthetic (discs on noise, written with h5py), so nothing but this checkout and the bundle is
needed. Results: OUT/gpu_proof.json (curves, max differences, pass/fail); exit status 1 when a check fails.
gpu=None runs the same checks on the CPU (tests/test_cuda_recipe.py keeps them working that way).
"""
import argparse
import os
import sys
import tempfile
import time

import h5py
import numpy as np

import caffe
from caffe import layers as L, params as P
from caffe.proto import caffe_pb2

import atomic
import paper
from prototxt import net as ts_net
from solver import make_solver
from tools import caffe_net


def synthetic_h5(folder, n, size, seed=0, scale=1.0):
    """n images 3 x size x size (noise plus a bright disc) and their disc labels; returns the list file."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:size, :size]
    data = rng.normal(0, scale / 4, (n, 3, size, size)).astype(np.float32)
    label = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        cy, cx, r = rng.randint(size // 4, 3 * size // 4, 2).tolist() + [rng.randint(size // 10, size // 4)]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        label[i, 0][disc] = 1
        data[i][:, disc] += scale
    path = os.path.join(folder, "data.h5")
    with h5py.File(path, "w") as f:
        f["data"], f["label"] = data, label
    lst = os.path.join(folder, "list.txt")
    with open(lst, "w") as f:
        f.write(path + "\n")
    return lst


def small_net(source):
    """conv-relu-pool-conv-relu-ip-softmax on 3x28x28, per-image class = has a disc pixel in the centre."""
    n = caffe.NetSpec()
    n.data, n.label = L.HDF5Data(ntop=2, hdf5_data_param=dict(source=source, batch_size=4, shuffle=False))
    n.centre = L.Crop(n.label, L.DummyData(shape=dict(dim=[1, 1, 1, 1])), crop_param=dict(axis=2, offset=14))
    n.cls = L.Reshape(n.centre, reshape_param=dict(shape=dict(dim=[-1])))
    n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=5, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, num_output=16, kernel_size=3, weight_filler=dict(type="xavier"))
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.ip = L.InnerProduct(n.relu2, num_output=2, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip, n.cls)
    return n.to_proto()


def train_curve(net_path, iters, gpu, solver_type="SGD", base_lr=0.01, seed=paper.SEED, solver=None):
    """Losses of `iters` solver steps; gpu None means CPU mode."""
    caffe_net.use_device(gpu)
    caffe.set_random_seed(seed)
    if solver is None:
        solver = caffe_pb2.SolverParameter(net=net_path, type=solver_type, base_lr=base_lr, momentum=0.9,
                                           lr_policy="fixed", max_iter=iters, random_seed=seed,
                                           snapshot_after_train=False, display=0)
    solver.solver_mode = caffe_pb2.SolverParameter.CPU if gpu is None else caffe_pb2.SolverParameter.GPU
    path = net_path + ".solver.prototxt"
    with open(path, "w") as f:
        f.write(str(solver))
    s = caffe.get_solver(path)
    losses, t0 = [], time.time()
    for _ in range(iters):
        s.step(1)
        losses.append(float(s.net.blobs["loss"].data))
    return losses, time.time() - t0


def compare(a, b, rtol):
    a, b = np.asarray(a), np.asarray(b)
    rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-6)
    return {"max_rel_diff": float(rel.max()), "rtol": rtol, "passed": bool(rel.max() <= rtol)}


def check_cpu_vs_gpu(tmp, gpu, iters):
    src = synthetic_h5(tmp, 16, 28, seed=1)
    path = os.path.join(tmp, "small.prototxt")
    with open(path, "w") as f:
        f.write(str(small_net(src)))
    cpu, t_cpu = train_curve(path, iters, None)
    gpu_l, t_gpu = train_curve(path, iters, gpu)
    return dict(compare(cpu, gpu_l, 1e-3), cpu=cpu, gpu=gpu_l, seconds_cpu=t_cpu, seconds_gpu=t_gpu)


def check_loss_layers(tmp, gpu, iters, fc_channels=None):
    # Moderate inputs and the report's learning rate: InfogainLoss clamps p at 1e-20 (log -46), the Python
    # loss does not, so saturated scores (e.g. the fast profile's 100x rate) differ by design, not by fault.
    src = synthetic_h5(tmp, 8, paper.INPUT_SIZE, seed=2, scale=10.0)
    curves, seconds = {}, {}
    for loss in ts_net.LOSSES:
        path = os.path.join(tmp, "ts_fcn_%s.prototxt" % loss)
        h = ts_net.write_infogain_matrix(os.path.join(tmp, "H.binaryproto"))
        proto = ts_net.ts_fcn("train", loss=loss, train_source=src, infogain_source=h, fc_channels=fc_channels)
        # HDF5Data shuffles with std::rand, which no seed resets within one process: no shuffle here.
        proto.layer[0].hdf5_data_param.shuffle = False
        with open(path, "w") as f:
            f.write(str(proto))
        solver = make_solver.solver_parameter(path, epoch=8, snapshot_prefix=os.path.join(tmp, loss),
                                              profile="paper", gpu=True, max_iter=iters, display=0)
        solver.snapshot_after_train = False
        curves[loss], seconds[loss] = train_curve(path, iters, gpu, solver=solver)
    a, b = (curves[k] for k in ts_net.LOSSES)
    return dict(compare(a, b, 1e-3), curves=curves, seconds=seconds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", type=int, default=0, help="GPU id")
    ap.add_argument("--iters", type=int, default=50, help="solver steps per curve")
    ap.add_argument("--out", required=True, help="folder for gpu_proof.json")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    result = {"caffe": caffe.__file__, "gpu": args.gpu}
    with tempfile.TemporaryDirectory() as tmp:
        result["cpu_vs_gpu"] = check_cpu_vs_gpu(tmp, args.gpu, args.iters)
        print("(a) CPU vs GPU: max rel diff %.2e" % result["cpu_vs_gpu"]["max_rel_diff"], flush=True)
        result["loss_layers"] = check_loss_layers(tmp, args.gpu, args.iters)
        print("(b) Python loss vs InfogainLoss on the GPU: max rel diff %.2e"
              % result["loss_layers"]["max_rel_diff"], flush=True)
    atomic.write_json(os.path.join(args.out, "gpu_proof.json"), result)
    ok = result["cpu_vs_gpu"]["passed"] and result["loss_layers"]["passed"]
    print("gpu proof", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
