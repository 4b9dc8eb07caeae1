#!/usr/bin/env python3
"""`make bench`: every stage of the toolkit timed against its ceiling -> bench/results.json + a table.

Owns the measurement (no other module times anything for the README). Stages (``--only``):

  machine   CPU model, cores, load, the BLAS library and core in use, threads, Caffe/numpy versions
  flops     the net's FLOPs per image, counted from the blob shapes of the real Caffe net
            (convolution / deconvolution / inner product: 2 x MACs; training: forward + weight
            gradients + bottom gradients, i.e. about 3x forward)
  sgemm     float32 GEMM GFLOP/s of the BLAS in use (numpy and Caffe link the same libblas.so.3):
            square 1024 (the ceiling every net figure is compared with) and fc6/fc7's own shapes
  train     one TS-FCN training iteration through pycaffe (HDF5 batch 1, forward, loss, backward,
            Adam update = solver.step(1)), with the Python loss and with Caffe's InfogainLoss, plus a
            per-layer forward/backward split
  forward   the deploy net's forward per image at batch 1 and batch 16
  data      `make data` for one phantom patient (200 slices): reading/decoding, preprocessing (box,
            crop, HU window, 8x augmentation), HDF5 writing (data_prep.make_data.process_patient)
  segment   `make segment` (tools/segment.py, the real command line) on a 30-slice tumor

Every figure is the median of ``--repeat`` runs (default 3) after one warm-up run. A stage whose
modules are missing, or that fails, is reported as "n/a" with the reason; the others still run.
``--quick`` is for tests: one run, no warm-up, a narrow net (fc6/fc7 64 wide instead of 4096) and tiny
inputs; its figures are not the benchmark.

Net weights are deterministic (numpy, seed 0), so ``--save-outputs`` / ``--compare`` can check that a
BLAS or thread variant computes the same outputs: the deploy net's prob on a fixed input and the train
losses of a fixed, seeded run (max abs difference in the JSON).
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

if __name__ == "__main__" and __package__ in (None, ""):  # `python3 tools/bench.py`: repo root on path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import atomic  # noqa: E402
import paper  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY_PROTOTXT = os.path.join(REPO, "prototxt", "deploy.prototxt")
STAGES = ("machine", "flops", "sgemm", "train", "forward", "data", "segment")
GEMM_LAYERS = ("Convolution", "Deconvolution", "InnerProduct")
DATA_LAYERS = ("Input", "HDF5Data", "Data", "ImageData", "MemoryData", "DummyData")
SGEMM_N = 1024               # the square GEMM of the ceiling (as tools/runtime/blas_core.py)
DATA_SLICES = 200            # a typical CT series (SPEC §5)
SEGMENT_SLICES = 30          # the tumor length of the `make segment` target
FORWARD_BATCH = 16
QUICK_FC = 64                # fc6/fc7 width of the --quick net
# The targets of the bench issue on a 2-core machine (seconds); the report's GPU figure for context.
TARGETS = {"train_iter_s": 1.5, "forward_s": 0.35, "data_s_per_patient": 1.0, "segment_s": 5.0}
REPORT_ITER_S = paper.REPORT_HOURS * 3600.0 / paper.REPORT_ITERATIONS


class NotAvailable(Exception):
    """A stage cannot run here (a module not written yet, no GPU, ...): reported as n/a."""


def log(msg):
    print("[bench] %s" % msg, file=sys.stderr, flush=True)


def median(values):
    return float(statistics.median(values)) if values else None


def timed_runs(fn, repeat, warmup=1):
    """Seconds of `repeat` calls of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


# --- machine facts ---------------------------------------------------------------------------------

def blas_libraries():
    """The BLAS/LAPACK shared objects mapped into this process (after numpy and caffe are imported)."""
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                name = os.path.basename(path).lower()
                if "cpython" not in name and any(k in name for k in ("blas", "mkl", "blis", "lapack",
                                                                         "gomp", "iomp")):
                    libs.add(path)
    except OSError:
        pass
    return sorted(libs)


def machine_facts():
    import caffe
    from tools.runtime import blas_core
    facts = {
        "cpu_model": blas_core.cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "avx512": "avx512f" in blas_core.cpu_flags(),
        "loadavg": loadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "caffe": getattr(caffe, "__version__", "unknown"),
        "blas_core": os.environ.get("OPENBLAS_CORETYPE"),
        "blas_libraries": blas_libraries(),
        "threads": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                   "MKL_NUM_THREADS", "BLIS_NUM_THREADS")},
    }
    try:
        rec = blas_core.load_cache()
        if rec:
            facts["blas_core_cached_sgemm_gflops"] = rec.get("sgemm_gflops")
    except Exception:  # the cache is informative only
        pass
    facts["git_commit"] = git_commit()
    return facts


def git_commit():
    """HEAD of the checkout, read from .git (the runtime has no git)."""
    try:
        with open(os.path.join(REPO, ".git", "HEAD")) as f:
            head = f.read().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            path = os.path.join(REPO, ".git", ref)
            if os.path.exists(path):
                with open(path) as f:
                    return f.read().strip()[:12]
            with open(os.path.join(REPO, ".git", "packed-refs")) as f:
                for line in f:
                    if line.strip().endswith(" " + ref):
                        return line.split()[0][:12]
            return None
        return head[:12]
    except OSError:
        return None


# --- FLOPs from the real Caffe net -----------------------------------------------------------------

def _layer_params(netparam):
    """layer name -> list of lr_mult of its param blobs (default 1) from a NetParameter."""
    return {l.name: [p.lr_mult if p.HasField("lr_mult") else 1.0 for p in l.param] for l in netparam.layer}


def count_flops(prototxt, caffe_net=None):
    """FLOPs per image of a deploy prototxt, from the blob shapes of the real Caffe net.

    Per layer with a GEMM (Convolution, Deconvolution, InnerProduct): forward = 2 x MACs, where MACs =
    weight elements x output pixels (convolution) or x input pixels (deconvolution); training adds the
    weight gradient (same MACs; none for a layer with lr_mult 0) and the bottom gradient (same MACs;
    none for the layer on the data input, which Caffe does not back-propagate into). Returns
    {"layers": {name: {type, forward_gflop, train_gflop}}, "forward_gflop", "train_gflop"}.
    """
    import caffe
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format
    netparam = caffe_pb2.NetParameter()
    with open(prototxt) as f:
        text_format.Merge(f.read(), netparam)
    lr = _layer_params(netparam)
    net = caffe_net or caffe.Net(prototxt, caffe.TEST)
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
        macs = float(weights.size) * float(pixels)
        fwd = 2.0 * macs
        mults = lr.get(name) or [1.0]
        weight_grad = fwd if mults[0] > 0 else 0.0
        bottom_grad = 0.0 if net.bottom_names[name][0] in inputs else fwd
        layers[name] = {"type": layer.type, "forward_gflop": fwd / 1e9,
                        "train_gflop": (fwd + weight_grad + bottom_grad) / 1e9}
    return {"layers": layers,
            "forward_gflop": sum(l["forward_gflop"] for l in layers.values()),
            "train_gflop": sum(l["train_gflop"] for l in layers.values())}


# --- deterministic weights and data ----------------------------------------------------------------

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


def set_mode(gpu):
    import caffe
    if gpu is None:
        caffe.set_mode_cpu()
    else:
        caffe.set_device(int(gpu))
        caffe.set_mode_gpu()


# --- stages ----------------------------------------------------------------------------------------

def stage_sgemm(ctx):
    n = SGEMM_N if not ctx.quick else 256
    shapes = {"square%d" % n: (n, n, n)}
    if not ctx.quick:
        # Caffe's GEMMs of the two big layers at batch 1: weights (M x K) @ columns (K x N pixels).
        side = paper.BLOB_SIDES["fc6"]
        shapes["fc6"] = (paper.FC6_CHANNELS, paper.CONV_BLOCKS[-1][0] * paper.FC6_KERNEL ** 2, side * side)
        shapes["fc7"] = (paper.FC7_CHANNELS, paper.FC6_CHANNELS, side * side)
    rng = np.random.RandomState(0)
    out = {}
    for key, (m, k, nn) in shapes.items():
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, nn)).astype(np.float32)
        runs = timed_runs(lambda: a @ b, max(ctx.repeat, 5) if not ctx.quick else 1, warmup=1)
        out[key] = 2.0 * m * k * nn / median(runs) / 1e9
    return {"sgemm_gflops": out["square%d" % n], "sgemm_shapes_gflops": out}


def _train_net_files(tmp, loss, fc_channels, images=1):
    """A train prototxt of the real TS-FCN reading a tiny HDF5 file (absolute paths), and its solver.
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
    proto = os.path.join(tmp, "train_%s.prototxt" % loss)
    net.write(proto, split="train", loss=loss, train_source=os.path.join(tmp, "bench_train.txt"),
              fc_channels=fc_channels)
    solver_path = os.path.join(tmp, "solver_%s.prototxt" % loss)
    sp = make_solver.solver_parameter(proto, 20000, os.path.join(tmp, "snap"), profile="paper",
                                      gpu=False, max_iter=10 ** 7)
    make_solver.write(solver_path, sp)
    return proto, solver_path


def _solver(ctx, loss):
    import caffe
    _, solver_path = _train_net_files(ctx.tmp, loss, ctx.fc_channels)
    set_mode(ctx.gpu)
    caffe.set_random_seed(paper.SEED)
    solver = caffe.get_solver(solver_path)
    fill_weights(solver.net)
    return solver


def _layer_split(net, repeat):
    """Median seconds of each layer's forward and backward in a train net (pycaffe _forward/_backward)."""
    names = list(net._layer_names)
    fwd = {n: [] for n in names}
    bwd = {n: [] for n in names}
    for _ in range(repeat):
        for i, n in enumerate(names):
            t = time.perf_counter()
            net._forward(i, i)
            fwd[n].append(time.perf_counter() - t)
        for i in reversed(range(len(names))):
            t = time.perf_counter()
            net._backward(i, i)
            bwd[names[i]].append(time.perf_counter() - t)
    return {n: {"forward_s": median(fwd[n]), "backward_s": median(bwd[n])} for n in names
            if median(fwd[n]) + median(bwd[n]) > 1e-4}


def stage_train(ctx):
    out = {}
    for loss, key in (("python", "train_iter_s"), ("infogain", "train_iter_infogain_s")):
        solver = _solver(ctx, loss)
        runs = timed_runs(lambda: solver.step(1), ctx.repeat, ctx.warmup)
        out[key] = median(runs)
        out[key + "_runs"] = runs
        if loss == "python":
            out["train_layers"] = _layer_split(solver.net, ctx.repeat)
        del solver
    if ctx.save_outputs or ctx.compare:
        caffe_losses = []
        solver = _solver(ctx, "python")
        for _ in range(3):
            solver.step(1)
            caffe_losses.append(float(solver.net.blobs["loss"].data))
        solver.net.forward()
        ctx.outputs["train_losses"] = np.array(caffe_losses)
        ctx.outputs["train_score"] = solver.net.blobs["score_crop"].data.copy()
    return out


def deploy_net(ctx):
    import caffe
    set_mode(ctx.gpu)
    if ctx.fc_channels is None:
        path = DEPLOY_PROTOTXT
    else:
        from prototxt import net
        path = os.path.join(ctx.tmp, "deploy_quick.prototxt")
        if not os.path.exists(path):
            net.write(path, split="deploy", fc_channels=ctx.fc_channels)
    n = caffe.Net(path, caffe.TEST)
    fill_weights(n)
    return path, n


def stage_forward(ctx):
    _, n = deploy_net(ctx)
    out = {}
    for batch, key in ((1, "forward_s"), (FORWARD_BATCH if not ctx.quick else 2, "forward_b16_s")):
        x, _ = bench_input(batch)
        n.blobs["data"].reshape(*x.shape)
        n.reshape()
        n.blobs["data"].data[...] = x
        runs = timed_runs(n.forward, ctx.repeat, ctx.warmup)
        out[key] = median(runs) / batch
        out[key + "_runs"] = [r / batch for r in runs]
        if batch == 1 and (ctx.save_outputs or ctx.compare):
            ctx.outputs["deploy_prob"] = n.blobs["prob"].data.copy()
    out["forward_b16_batch"] = FORWARD_BATCH if not ctx.quick else 2
    return out


def stage_flops(ctx):
    path, n = deploy_net(ctx)
    f = count_flops(path, n)
    return {"net_gflop_per_image": f["forward_gflop"], "net_train_gflop_per_image": f["train_gflop"],
            "net_prototxt": os.path.relpath(path, REPO) if path.startswith(REPO) else os.path.basename(path),
            "net_layers_gflop": {k: round(v["forward_gflop"], 4) for k, v in f["layers"].items()}}


def _phantoms():
    try:
        from data_prep import phantoms
    except ImportError as e:
        raise NotAvailable("data_prep.phantoms not available yet (%s)" % e)
    return phantoms


def _write_phantom(phantoms, folder, slices, size, tumor_mm=None, kind="rtstruct"):
    """One phantom patient (DICOM CT + RTSTRUCT by default) of `slices` slices written into `folder`
    with the PHANTOM engineer's make_patient / write_patient; returns the patient dict (true mask)."""
    p = phantoms.make_patient(paper.SEED, 0, kind=kind, n_slices=slices, tumor_mm=tumor_mm, size=size)
    phantoms.write_patient(folder, p)
    return p


def stage_data(ctx):
    phantoms = _phantoms()
    from data_prep import make_data
    slices = DATA_SLICES if not ctx.quick else 20
    raw = os.path.join(ctx.tmp, "data_raw", "patient")
    p = _write_phantom(phantoms, raw, slices, phantoms.DEFAULT_SIZE if not ctx.quick else 128)
    params = make_data.make_params()
    runs = []
    for i in range(ctx.warmup + ctx.repeat):
        data_dir = os.path.join(ctx.tmp, "data_out%d" % i)
        t = {}
        make_data.process_patient(raw, "P001", params, data_dir, timings=t)
        shutil.rmtree(data_dir, ignore_errors=True)
        if i >= ctx.warmup:
            runs.append(t)
    keys = sorted(set().union(*runs))
    med = {k: median([r[k] for r in runs if k in r]) for k in keys}
    hdf5 = (med.get("write") or 0.0) + (med.get("write_aug") or 0.0)
    return {"data_s_per_patient": med.get("total"), "data_read_s": med.get("read"),
            "data_preprocess_s": med.get("preprocess"), "data_hdf5_s": hdf5,
            "data_stages_s": med, "data_slices": slices, "data_slice_pixels": int(p["size"]),
            "data_tumor_slices": int(p["mask"].any(axis=(1, 2)).sum())}


def stage_segment(ctx):
    phantoms = _phantoms()
    prototxt, n = deploy_net(ctx)
    model = os.path.join(ctx.tmp, "bench.caffemodel")
    n.save(model)
    del n
    slices = SEGMENT_SLICES if not ctx.quick else 4
    scan_dir = os.path.join(ctx.tmp, "segment_raw", "patient")
    # A large tumor so that it spans the slices segmented; the range is centred on it.
    p = _write_phantom(phantoms, scan_dir, 2 * slices, phantoms.DEFAULT_SIZE if not ctx.quick else 128,
                       tumor_mm=phantoms.TUMOR_MM_RANGE[1])
    mask = p["mask"]
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    z0 = int(max(0, min((zs[0] + zs[-1] + 1) // 2 - slices // 2, mask.shape[0] - slices)))
    z1 = z0 + slices
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    box = "%d,%d,%d,%d" % (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    cmd = [sys.executable, os.path.join(REPO, "tools", "segment.py"), "--scan", scan_dir, "--box", box,
           "--slices", "%d:%d" % (z0, z1), "--model", model, "--prototxt", prototxt]
    if ctx.gpu is not None:
        cmd += ["--gpu", str(ctx.gpu)]
    walls, summaries = [], []
    for i in range(ctx.warmup + ctx.repeat):
        out = os.path.join(ctx.tmp, "segment_out%d" % i)
        t = time.perf_counter()
        p = subprocess.run(cmd + ["--out", out], capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError("tools/segment.py failed: %s" % (p.stderr.strip().splitlines() or ["?"])[-1])
        if i >= ctx.warmup:
            walls.append(wall)
            with open(os.path.join(out, "summary.json")) as f:
                summaries.append(json.load(f)["seconds"])
        shutil.rmtree(out, ignore_errors=True)
    parts = {k: median([s[k] for s in summaries]) for k in summaries[0]}
    return {"segment_s": median(walls), "segment_runs": walls, "segment_slices": z1 - z0,
            "segment_tumor_slices": int(mask[z0:z1].any(axis=(1, 2)).sum()),
            "segment_stages_s": parts}


STAGE_FUNCS = {"sgemm": stage_sgemm, "flops": stage_flops, "train": stage_train, "forward": stage_forward,
               "data": stage_data, "segment": stage_segment}


# --- derived figures, table, markdown --------------------------------------------------------------

def derive(r):
    """GFLOP/s and the fraction of the sgemm ceiling of each net figure."""
    ceiling = r.get("sgemm_gflops")
    fwd, train = r.get("net_gflop_per_image"), r.get("net_train_gflop_per_image")
    eff = {}
    for key, gflop in (("train_iter_s", train), ("train_iter_infogain_s", train),
                       ("forward_s", fwd), ("forward_b16_s", fwd)):
        s = r.get(key)
        if s and gflop:
            g = gflop / s
            eff[key] = {"gflops": g, "fraction_of_sgemm": (g / ceiling) if ceiling else None}
    r["efficiency"] = eff
    return r


ROWS = [  # key, label, unit
    ("train_iter_s", "training iteration, Python loss (batch 1, fwd+loss+bwd+Adam)", "s"),
    ("train_iter_infogain_s", "training iteration, InfogainLoss", "s"),
    ("forward_s", "deploy forward, batch 1", "s/image"),
    ("forward_b16_s", "deploy forward, batch 16", "s/image"),
    ("data_s_per_patient", "make data, one {data_slices}-slice phantom patient", "s"),
    ("data_read_s", "  reading / decoding DICOM", "s"),
    ("data_preprocess_s", "  preprocessing (box, crop, window, 8x augment)", "s"),
    ("data_hdf5_s", "  HDF5 writing", "s"),
    ("segment_s", "make segment, {segment_slices} tumor slices (whole command)", "s"),
    ("sgemm_gflops", "sgemm 1024^3 (the ceiling)", "GFLOP/s"),
    ("net_gflop_per_image", "net forward FLOPs per image (from the prototxt)", "GFLOP"),
    ("net_train_gflop_per_image", "net training FLOPs per image (fwd + both gradients)", "GFLOP"),
]


def _fmt(v, unit):
    if v is None:
        return "n/a"
    if unit == "GFLOP/s" or unit == "GFLOP":
        return "%.1f" % v
    return "%.3f" % v if v < 10 else "%.1f" % v


def rows(r):
    out = []
    for key, label, unit in ROWS:
        if key not in r:  # a stage not asked for (--only)
            continue
        v = r.get(key)
        eff = r.get("efficiency", {}).get(key)
        ceil = ("%.0f GFLOP/s, %.0f%%" % (eff["gflops"], 100 * eff["fraction_of_sgemm"])
                if eff and eff.get("fraction_of_sgemm") else "")
        target = ("<= %g s" % TARGETS[key]) if key in TARGETS else ""
        why = r.get("not_available", {}).get(key, "")
        label = label.format(data_slices=r.get("data_slices") or DATA_SLICES,
                             segment_slices=r.get("segment_slices") or SEGMENT_SLICES)
        out.append((label, _fmt(v, unit) + ("" if v is None else " " + unit), ceil, target, why))
    return out


def table(r):
    lines = []
    m = r.get("machine", {})
    lines.append("TS-FCN bench: %s, %s CPUs, BLAS core %s, load %s%s" % (
        m.get("cpu_model"), m.get("cpus"), m.get("blas_core"), r.get("loadavg_start"),
        " (QUICK: not the benchmark)" if r.get("quick") else ""))
    for label, val, ceil, target, why in rows(r):
        lines.append("  %-62s %16s  %-22s %-9s %s" % (label, val, ceil, target, ("n/a: " + why) if why else ""))
    lines.append("  report: ~%d h for ~%d k iterations on a 2016 GPU = %.2f s/iteration" % (
        paper.REPORT_HOURS, paper.REPORT_ITERATIONS // 1000, REPORT_ITER_S))
    return "\n".join(lines)


def markdown(r, command):
    m = r.get("machine", {})
    out = ["Measured with `%s` on %s (%s CPUs, BLAS: OpenBLAS core %s, %s threads; 1-min load %s), "
           "medians of %d runs after a warm-up. FLOPs are counted from the prototxt; the percentage is "
           "the achieved GFLOP/s over the sgemm ceiling of the same BLAS."
           % (command, m.get("cpu_model"), m.get("cpus"), m.get("blas_core"),
              (m.get("threads") or {}).get("OPENBLAS_NUM_THREADS") or m.get("cpus"),
              r.get("loadavg_start"), r.get("repeat")),
           "",
           "| stage | time | GFLOP/s (% of sgemm) | target |",
           "|---|---|---|---|"]
    for label, val, ceil, target, why in rows(r):
        out.append("| %s | %s | %s | %s |" % (label.strip(), val if not why else "n/a (%s)" % why, ceil,
                                              target.replace("<=", "≤")))
    out.append("")
    out.append("For context, the report trained ~%d k iterations in ~%d h on one 2016 GPU: ≈ %.2f s per "
               "iteration." % (paper.REPORT_ITERATIONS // 1000, paper.REPORT_HOURS, REPORT_ITER_S))
    return "\n".join(out) + "\n"


# --- driver ----------------------------------------------------------------------------------------

class Context:
    def __init__(self, args, tmp):
        self.quick = args.quick
        self.repeat = 1 if args.quick else max(1, args.repeat)
        self.warmup = 0 if args.quick else 1
        self.gpu = args.gpu
        self.tmp = tmp
        self.fc_channels = QUICK_FC if args.quick else None
        self.save_outputs = args.save_outputs
        self.compare = args.compare
        self.outputs = {}


def compare_outputs(outputs, ref_path):
    ref = np.load(ref_path)
    diffs = {}
    for k, v in outputs.items():
        if k in ref.files and ref[k].shape == v.shape:
            diffs[k] = float(np.abs(ref[k].astype(np.float64) - v).max())
        else:
            diffs[k] = None
    return diffs


def run(args):
    only = STAGES if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in only if s not in STAGES]
    if bad:
        raise SystemExit("bench: unknown stage(s) %s; choose from %s" % (", ".join(bad), ",".join(STAGES)))
    r = {"schema": 1, "quick": bool(args.quick), "repeat": 1 if args.quick else args.repeat,
         "label": args.label, "gpu": args.gpu, "loadavg_start": (loadavg() or [None])[0],
         "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": {}, "not_available": {},
         "targets": TARGETS, "report_s_per_iteration": REPORT_ITER_S}
    import caffe  # noqa: F401  (load Caffe's BLAS before the machine facts list it)
    tmp = tempfile.mkdtemp(prefix="tsfcn-bench-")
    try:
        ctx = Context(args, tmp)
        # The ceiling and the FLOPs first: every net figure is compared with them.
        order = [s for s in ("sgemm", "flops", "train", "forward", "data", "segment") if s in only]
        stage_keys = {"sgemm": ["sgemm_gflops"], "flops": ["net_gflop_per_image", "net_train_gflop_per_image"],
                      "train": ["train_iter_s", "train_iter_infogain_s"],
                      "forward": ["forward_s", "forward_b16_s"],
                      "data": ["data_s_per_patient", "data_read_s", "data_preprocess_s", "data_hdf5_s"],
                      "segment": ["segment_s"]}
        for s in order:
            log("stage %s ..." % s)
            t = time.perf_counter()
            try:
                res = STAGE_FUNCS[s](ctx)
                r.update(res)
                r["stages"][s] = {"status": "ok", "seconds": time.perf_counter() - t}
            except Exception as e:  # a stage that cannot run is reported, never a crash
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                if not isinstance(e, NotAvailable):
                    reason = "%s: %s" % (type(e).__name__, reason)
                    traceback.print_exc(file=sys.stderr)
                r["stages"][s] = {"status": "n/a", "reason": reason}
                for k in stage_keys[s]:
                    r.setdefault(k, None)
                    r["not_available"][k] = reason
            log("stage %s: %s (%.0f s)" % (s, r["stages"][s]["status"], time.perf_counter() - t))
        if "machine" in only:
            r["machine"] = machine_facts()
        if ctx.outputs:
            if args.save_outputs:
                with atomic.atomic_path(args.save_outputs) as p:
                    with open(p, "wb") as f:
                        np.savez(f, **ctx.outputs)
            if args.compare:
                r["outputs_max_abs_diff"] = compare_outputs(ctx.outputs, args.compare)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r["loadavg_end"] = (loadavg() or [None])[0]
    return derive(r)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Stages: %s. " % ", ".join(STAGES) + "Writes OUT (JSON) and OUT with "
                                       ".md (a markdown table for the README); prints a table.")
    p.add_argument("--out", default=os.path.join("bench", "results.json"), help="results JSON (default: %(default)s)")
    p.add_argument("--gpu", type=int, default=None, help="GPU id for the net stages (default: CPU)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per figure after one warm-up (default: 3)")
    p.add_argument("--only", help="comma-separated stages to run (default: all)")
    p.add_argument("--quick", action="store_true", help="tests only: 1 run, narrow net, tiny inputs")
    p.add_argument("--label", help="a name for this variant (e.g. 'openblas-1thread'), stored in the JSON")
    p.add_argument("--save-outputs", help="save the deploy prob and train losses of the fixed input (.npz)")
    p.add_argument("--compare", help="an .npz from --save-outputs: record the max abs differences")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.repeat < 1:
        raise SystemExit("bench: --repeat must be at least 1")
    r = run(args)
    atomic.write_json(args.out, r)
    cmd = "python3 tools/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = os.path.splitext(args.out)[0] + ".md"
    atomic.write_text(md, markdown(r, cmd))
    print(table(r))
    if r.get("outputs_max_abs_diff"):
        print("outputs vs %s: max abs diff %s" % (args.compare, r["outputs_max_abs_diff"]))
    print("wrote %s and %s" % (args.out, md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
