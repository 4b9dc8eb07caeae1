"""GPU proof of the CUDA Caffe build (tools/cuda/gpu-proof.sh runs it from the bundle's own Python).

One JSON, OUT/gpu_proof.json, with:
  device         the GPU's name, compute capability, memory and the driver (nvidia-smi, caffe device_query,
                 libcuda's cuDriverGetVersion); on the CPU half, the CPU.
  cpu_vs_gpu     a small conv net without dropout, same seed and data, trained on the CPU and on the GPU:
                 the loss curves (20 iterations) and their largest relative difference (float32, different
                 BLAS: agree to ~1e-4, not bit for bit).
  loss_layers    TS-FCN on the GPU with the Python loss (layers/weighted_loss.py) and with InfogainLoss,
                 same seed (same weights, same dropout masks), 100 iterations: both curves, largest
                 relative difference.
  caffe_time     `caffe time` of the TS-FCN training net at batch 1 (Python loss): forward, backward and
                 forward-backward ms per iteration.
  fast_training  phantoms made here (data_prep.phantoms, DICOM CT + RTSTRUCT) -> `make data`'s
                 data_prep.make_data (the same crop, augmentation and HDF5 code) -> tools.train with the
                 fast profile on fold 0 (its narrow start, then --max-iter 1000 of the full net): wall
                 time, seconds per iteration of the full net and the validation 3D Dice.
  paper_estimate the paper profile's iterations for that data (5 epochs; make_solver's epoch size) and
                 its expected hours at the measured seconds per iteration.
--cpu runs the same steps on the CPU at smoke-test sizes (no GPU comparison: cpu_vs_gpu keeps the CPU
curve only), so that everything but the GPU itself is tested on any machine. Exit status 1 when a check
fails. Needs only the checkout and the bundle's Python (numpy, h5py, scipy, pydicom, tqdm, pycaffe).
"""
import argparse
import ctypes
import json
import os
import platform
import re
import shutil
import subprocess
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

# Sizes of each step: on the GPU (the proof) and on the CPU half (a smoke test of the same code).
SIZES = {
    "gpu": {"compare_iters": 20, "loss_iters": 100, "time_iters": 50, "max_iter": 1000, "validate_every": 250,
            "patients": 6, "folds": 3, "size": 512, "fc_channels": None, "narrow_start": None},
    "cpu": {"compare_iters": 3, "loss_iters": 2, "time_iters": 1, "max_iter": 4, "validate_every": 4,
            "patients": 3, "folds": 3, "size": 192, "fc_channels": 64, "narrow_start": "none"},
}
# (narrow_start None: the fast profile's own narrow start; "none": without one, as tools.train --narrow-start.)
PHANTOM_KIND = "rtstruct"       # DICOM CT + RTSTRUCT: the readers need pydicom only
FOLD = 0


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
    """The small net's loss curves on the CPU and on GPU `gpu`; gpu None: the CPU curve only."""
    src = synthetic_h5(tmp, 16, 28, seed=1)
    path = os.path.join(tmp, "small.prototxt")
    with open(path, "w") as f:
        f.write(str(small_net(src)))
    cpu, t_cpu = train_curve(path, iters, None)
    if gpu is None:
        return {"passed": None, "skipped": "no GPU (CPU half)", "cpu": cpu, "gpu": None, "seconds_cpu": t_cpu}
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


def _run(cmd, env=None, timeout=None):
    """(exit status, stdout+stderr) of a command."""
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, env=env,
                       timeout=timeout)
    return r.returncode, r.stdout


def device_info(gpu):
    """What runs the proof: the GPU (name, capability, memory, driver) or, for the CPU half, the CPU."""
    if gpu is None:
        return {"mode": "CPU", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    info = {"mode": "GPU %d" % gpu}
    rc, out = _run(["caffe", "device_query", "-gpu", str(gpu)], env=dict(os.environ, GLOG_minloglevel="0",
                                                                        GLOG_logtostderr="1"))
    fields = dict(re.findall(r"\]\s+([A-Za-z ]+?):\s+(.+)$", out, re.M))
    info["name"] = fields.get("Name")
    if "Major revision number" in fields:
        info["compute_capability"] = "%s.%s" % (fields["Major revision number"], fields.get("Minor revision number"))
    if "Total global memory" in fields:
        info["memory_gib"] = round(int(fields["Total global memory"]) / 2.0 ** 30, 1)
    try:
        v = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
        info["driver_cuda_version"] = "%d.%d" % (v.value // 1000, v.value % 1000 // 10)
    except (OSError, AttributeError):
        pass
    if shutil.which("nvidia-smi"):
        rc, out = _run(["nvidia-smi", "-i", str(gpu), "--query-gpu=name,driver_version,memory.total",
                        "--format=csv,noheader"])
        if rc == 0 and out.strip():
            name, driver, memory = [x.strip() for x in out.strip().splitlines()[0].split(",")][:3]
            info.update(name=info["name"] or name, driver=driver, memory=memory)
    return info


def caffe_time(tmp, gpu, iters, fc_channels=None):
    """`caffe time` of the TS-FCN training net (Python loss, batch 1): ms per forward / backward / both."""
    src = synthetic_h5(tmp, 8, paper.INPUT_SIZE, seed=3, scale=10.0)
    path = os.path.join(tmp, "time_train.prototxt")
    with open(path, "w") as f:
        f.write(str(ts_net.ts_fcn("train", train_source=src, fc_channels=fc_channels)))
    cmd = ["caffe", "time", "-model", path, "-iterations", str(iters)] + ([] if gpu is None else ["-gpu", str(gpu)])
    t0 = time.time()
    rc, out = _run(cmd, env=dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1"), timeout=600)
    result = {"iterations": iters, "batch_size": 1, "command": " ".join(cmd[:1] + ["time", "-model",
              "train.prototxt"] + cmd[4:]), "seconds": round(time.time() - t0, 1), "passed": rc == 0}
    for key, label in (("forward_ms", "Average Forward pass"), ("backward_ms", "Average Backward pass"),
                       ("forward_backward_ms", "Average Forward-Backward")):
        m = re.search(label + r": ([0-9.]+) ms", out)
        result[key] = float(m.group(1)) if m else None
    if rc != 0 or result["forward_backward_ms"] is None:
        result["passed"] = False
        result["log_tail"] = out.splitlines()[-10:]
    return result


def make_phantom_data(work, patients, folds, size, seed=paper.SEED):
    """Phantoms (DICOM CT + RTSTRUCT) and `make data` on them, in subprocesses (no CUDA state forked):
    returns (DATA folder, seconds)."""
    raw, data = os.path.join(work, "raw"), os.path.join(work, "data")
    jobs = str(max(1, min(os.cpu_count() or 1, patients)))
    t0 = time.time()
    for cmd in ([sys.executable, "-m", "data_prep.phantoms", "--out", raw, "--n", str(patients), "--size", str(size),
                 "--seed", str(seed), "--jobs", jobs, "--kind", PHANTOM_KIND],
                [sys.executable, "-m", "data_prep.make_data", "--raw", raw, "--data", data, "--folds", str(folds),
                 "--seed", str(seed), "--jobs", jobs]):
        rc, out = _run(cmd)
        if rc != 0:
            raise RuntimeError("%s failed:\n%s" % (" ".join(cmd[1:3]), "\n".join(out.splitlines()[-10:])))
    return data, time.time() - t0


def fast_training(data, run, gpu, max_iter, validate_every, fc_channels=None, narrow_start=None):
    """tools.train, fast profile, fold 0, --max-iter (after the profile's narrow start, unless narrow_start
    overrides it): wall time, seconds per iteration, validation 3D Dice."""
    cmd = [sys.executable, "-m", "tools.train", "--fold", str(FOLD), "--data", data, "--run", run,
           "--profile", "fast", "--max-iter", str(max_iter), "--validate-every", str(validate_every),
           "--restart", "--quiet"]
    cmd += [] if gpu is None else ["--gpu", str(gpu)]
    cmd += [] if fc_channels is None else ["--fc-channels", str(fc_channels)]
    cmd += [] if narrow_start is None else ["--narrow-start", narrow_start]
    t0 = time.time()
    rc, out = _run(cmd)
    wall = time.time() - t0
    result = {"profile": "fast", "fold": FOLD, "max_iter": max_iter, "wall_seconds": round(wall, 1),
              "passed": rc == 0}
    metrics_path = os.path.join(run, "metrics.json")
    if rc == 0 and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            m = json.load(f)
        result.update({k: m.get(k) for k in ("iterations", "train_seconds", "seconds_per_iteration", "mean_dice_3d",
                                            "sd_dice_3d", "ceiling_dice_3d", "weights")})
        with open(os.path.join(run, "run.json")) as f:
            result["narrow_start"] = json.load(f).get("narrow_start")     # [channels, iterations, lr] or None
        result["dice_3d_per_patient"] = {pid: v.get("dice_3d") for pid, v in m.get("per_patient", {}).items()}
    else:
        result["passed"] = False
        result["log_tail"] = out.splitlines()[-15:]
    return result


def paper_estimate(data, seconds_per_iteration):
    """The paper profile's iterations for DATA's fold 0 (make_solver's epoch size x 5 epochs) and its hours."""
    epoch = make_solver.epoch_size(data, FOLD)
    max_iter = make_solver.schedule(epoch, "paper")[0]
    out = {"epoch_iterations": epoch, "epochs": paper.EPOCHS, "max_iter": max_iter,
           "seconds_per_iteration": seconds_per_iteration}
    if seconds_per_iteration:
        out["expected_hours"] = round(max_iter * seconds_per_iteration / 3600.0, 2)
        out["report_iterations_hours"] = round(paper.REPORT_ITERATIONS * seconds_per_iteration / 3600.0, 2)
        out["report_hours"] = paper.REPORT_HOURS
    return out


def _modules():
    import numpy, scipy, pydicom   # noqa: F401 (where the bundle's Python found them)
    return {m.__name__: os.path.dirname(m.__file__) for m in (caffe, numpy, h5py, scipy, pydicom)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--gpu", type=int, default=0, help="GPU id (default 0)")
    g.add_argument("--cpu", action="store_true", help="the CPU half: every step on the CPU, at smoke-test sizes")
    ap.add_argument("--out", required=True, help="folder for gpu_proof.json (and the training run)")
    ap.add_argument("--keep", action="store_true", help="keep the phantoms and the data under OUT/work")
    for key, value in SIZES["gpu"].items():
        if key not in ("fc_channels", "narrow_start"):
            ap.add_argument("--" + key.replace("_", "-"), type=int,
                            help="default %d on the GPU, %d on the CPU half" % (value, SIZES["cpu"][key]))
    args = ap.parse_args(argv)
    gpu = None if args.cpu else args.gpu
    sizes = dict(SIZES["cpu" if gpu is None else "gpu"])
    sizes.update({k: getattr(args, k) for k in sizes if getattr(args, k, None) is not None})
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(args.out, "gpu_proof.json")
    t_start = time.time()
    result = {"mode": "GPU" if gpu is not None else "CPU half", "cuda_build": caffe_net.cuda_build(),
              "python": sys.version.split()[0], "modules": _modules(), "sizes": sizes}

    def step(name, fn, *a, **kw):
        t0 = time.time()
        print("== %s" % name, flush=True)
        try:
            result[name] = fn(*a, **kw)
        except Exception as e:      # one step's failure is recorded; the others still run
            result[name] = {"passed": False, "error": "%s: %s" % (type(e).__name__, e)}
        result[name]["step_seconds"] = round(time.time() - t0, 1)
        brief = {k: v for k, v in result[name].items() if not isinstance(v, (list, dict))}
        print("   %s" % json.dumps(brief), flush=True)
        atomic.write_json(out_json, result)         # partial results survive a timeout

    work = os.path.join(args.out, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        # The phantoms and data first, before this process touches the GPU (their workers fork).
        step("phantom_data", lambda: dict(zip(("data", "seconds"), make_phantom_data(
            work, sizes["patients"], sizes["folds"], sizes["size"]))))
        step("device", device_info, gpu)
        with tempfile.TemporaryDirectory() as tmp:
            step("cpu_vs_gpu", check_cpu_vs_gpu, tmp, gpu, sizes["compare_iters"])
            step("loss_layers", check_loss_layers, tmp, gpu, sizes["loss_iters"], fc_channels=sizes["fc_channels"])
            step("caffe_time", caffe_time, tmp, gpu, sizes["time_iters"], fc_channels=sizes["fc_channels"])
        data = result["phantom_data"].get("data")
        if data:
            step("fast_training", fast_training, data, os.path.join(args.out, "train-fast"), gpu, sizes["max_iter"],
                 sizes["validate_every"], fc_channels=sizes["fc_channels"], narrow_start=sizes["narrow_start"])
            step("paper_estimate", paper_estimate, data, result["fast_training"].get("seconds_per_iteration"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    checks = ("phantom_data", "cpu_vs_gpu", "loss_layers", "caffe_time", "fast_training")
    failed = [k for k in checks if result.get(k, {}).get("passed", True) is False or k not in result]
    result.update(passed=not failed, failed=failed, seconds=round(time.time() - t_start, 1))
    atomic.write_json(out_json, result)
    print("gpu proof (%s) %s in %.0f s: %s" % (result["mode"], "PASSED" if not failed else "FAILED: " + ", ".join(failed),
                                             result["seconds"], out_json))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
