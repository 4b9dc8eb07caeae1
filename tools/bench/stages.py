"""The timed stages of `make bench`: sgemm (the ceiling), flops, train, forward, data, segment.

Each stage is a function of the run's Context returning a dict of results (merged into results.json);
one that cannot run here raises NotAvailable (or fails) and is reported as n/a by the driver.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

import paper
from solver import profiles
from tools.bench import nets
from tools.bench.common import REPO, NotAvailable, median, timed_runs

SGEMM_N = 1024               # the square GEMM of the ceiling (as tools/runtime/blas_core.py)
DATA_SLICES = 200            # a typical CT series (SPEC §5)
SEGMENT_SLICES = 30          # the tumor length of the `make segment` target
FORWARD_BATCH = 16


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


def stage_flops(ctx):
    path, n = nets.deploy_net(ctx)
    f = nets.count_flops(path, n)
    ctx.flops = f
    return {"net_gflop_per_image": f["forward_gflop"], "net_train_gflop_per_image": f["train_gflop"],
            "net_prototxt": nets.relpath(path),
            "net_layers_gflop": {k: {"forward": round(v["forward_gflop"], 4), "train": round(v["train_gflop"], 4)}
                                 for k, v in f["layers"].items()}}


def stage_train(ctx):
    out = {}
    for loss, key in (("python", "train_iter_s"), ("infogain", "train_iter_infogain_s")):
        solver = nets.make_solver(ctx, loss)
        runs = timed_runs(lambda: solver.step(1), ctx.repeat, ctx.warmup)
        out[key] = median(runs)
        out[key + "_runs"] = runs
        del solver
    if ctx.fc_channels is None:      # the fast profile's narrow start: the same net with narrow fc6/fc7
        channels = profiles.settings("fast")["narrow_start"][0]
        solver = nets.make_solver(ctx, "python", fc_channels=channels)
        runs = timed_runs(lambda: solver.step(1), ctx.repeat, ctx.warmup)
        out.update(train_iter_narrow_s=median(runs), train_iter_narrow_s_runs=runs, narrow_fc_channels=channels)
        del solver
    if ctx.save_outputs or ctx.compare:
        caffe_losses = []
        solver = nets.make_solver(ctx, "python")
        for _ in range(3):
            solver.step(1)
            caffe_losses.append(float(solver.net.blobs["loss"].data))
        solver.net.forward()
        ctx.outputs["train_losses"] = np.array(caffe_losses)
        ctx.outputs["train_score"] = solver.net.blobs["score_crop"].data.copy()
    return out


def stage_forward(ctx):
    _, n = nets.deploy_net(ctx)
    out = {}
    for batch, key in ((1, "forward_s"), (FORWARD_BATCH if not ctx.quick else 2, "forward_b16_s")):
        x, _ = nets.bench_input(batch)
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
    """The real `tools/segment.py` command line on a phantom tumor; its summary.json splits the time into
    reading the scan, loading the net, the crops, the forward, back-mapping and writing; what the wall
    clock adds to its total is Python's start and the imports."""
    phantoms = _phantoms()
    prototxt, n = nets.deploy_net(ctx)
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
    parts["start_and_imports"] = median([w - s["total"] for w, s in zip(walls, summaries)])
    return {"segment_s": median(walls), "segment_runs": walls, "segment_slices": z1 - z0,
            "segment_tumor_slices": int(mask[z0:z1].any(axis=(1, 2)).sum()),
            "segment_stages_s": parts}
