"""`make bench` / `python3 -m tools.bench`: every stage of the toolkit timed against its ceiling.

Stages (``--only``):

  machine   CPU model, cores, load, the BLAS library and core in use, threads, Caffe/numpy versions
  sgemm     float32 GEMM GFLOP/s of the BLAS in use (numpy and Caffe link the same libblas.so.3):
            square 1024 (the ceiling every net figure is compared with) and fc6/fc7's own shapes
  flops     the net's FLOPs per image, counted from the blob shapes of the real Caffe net
            (convolution / deconvolution / inner product: 2 x MACs; training: forward + weight
            gradients + bottom gradients, i.e. about 3x forward)
  train     one TS-FCN training iteration through pycaffe (HDF5 batch 1, forward, loss, backward,
            Adam update = solver.step(1)), with the Python loss and with Caffe's InfogainLoss, and (full net
            only) the same with the fast profile's narrow fc6/fc7 (its narrow start, tools/train.py)
  forward   the deploy net's forward per image at batch 1 and batch 16
  profile   where the time goes: each layer's forward and backward, the data layer, the Python loss,
            the solver's regularisation, Adam update and apply, the deploy net's layers, each against
            its ceiling (tools/bench/profile.py says how the solver's split is derived)
  data      `make data` for one phantom patient (200 slices): reading/decoding, preprocessing (box,
            crop, HU window, 8x augmentation), HDF5 writing (data_prep.make_data.process_patient)
  segment   `make segment` (tools/segment.py, the real command line) on a 30-slice tumor: the whole
            command and its parts (start, reading the scan, loading the net, forward, writing)

``--peer torch`` (`make bench PEER=torch`) also exports the train net's layers, weights and input for the
PyTorch peer, which `python3 -m tools.bench.peer_host` then runs on this machine and merges into the
results (tools/bench/peer_host.py).

Every figure is the median of ``--repeat`` runs (default 3) after one warm-up run. A stage whose
modules are missing, or that fails, is reported as "n/a" with the reason; the others still run.
``--quick`` is for tests: one run, no warm-up, a narrow net (fc6/fc7 64 wide instead of 4096) and tiny
inputs; its figures are not the benchmark.

Net weights are deterministic (numpy, seed 0), so ``--save-outputs`` / ``--compare`` can check that a
BLAS or thread variant computes the same outputs: the deploy net's prob on a fixed input and the train
losses of a fixed, seeded run (max abs difference in the JSON).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np

import atomic
from tools.bench import figure, machine, peer, profile, report, stages
from tools.bench.common import REPO, NotAvailable, loadavg, log

STAGES = ("machine", "sgemm", "flops", "train", "forward", "profile", "data", "segment")
STAGE_FUNCS = {"sgemm": stages.stage_sgemm, "flops": stages.stage_flops, "train": stages.stage_train,
               "forward": stages.stage_forward, "profile": profile.stage_profile, "data": stages.stage_data,
               "segment": stages.stage_segment}
# The keys each stage fills: set to None (n/a) when the stage fails.
STAGE_KEYS = {"sgemm": ["sgemm_gflops"], "flops": ["net_gflop_per_image", "net_train_gflop_per_image"],
              "train": ["train_iter_s", "train_iter_infogain_s", "train_iter_narrow_s"], "forward": ["forward_s", "forward_b16_s"],
              "profile": ["profile"],
              "data": ["data_s_per_patient", "data_read_s", "data_preprocess_s", "data_hdf5_s"],
              "segment": ["segment_s"]}
QUICK_FC = 64                # fc6/fc7 width of the --quick net
PEERS = ("torch",)
PEER_DIR = os.path.join("bench", "peer.tmp")


class Context:
    """What the stages share: settings, the temporary folder, the results so far, the FLOP count."""

    def __init__(self, args, tmp, results):
        self.quick = args.quick
        self.repeat = 1 if args.quick else max(1, args.repeat)
        self.warmup = 0 if args.quick else 1
        self.gpu = args.gpu
        self.tmp = tmp
        self.fc_channels = QUICK_FC if args.quick else None
        self.save_outputs = args.save_outputs
        self.compare = args.compare
        self.outputs = {}
        self.results = results
        self.flops = None


def compare_outputs(outputs, ref_path):
    ref = np.load(ref_path)
    diffs = {}
    for k, v in outputs.items():
        if k in ref.files and ref[k].shape == v.shape:
            diffs[k] = float(np.abs(ref[k].astype(np.float64) - v).max())
        else:
            diffs[k] = None
    return diffs


def _run_stage(name, fn, r):
    """Run one stage into r; a stage that cannot run is reported, never a crash."""
    log("stage %s ..." % name)
    t = time.perf_counter()
    try:
        r.update(fn())
        r["stages"][name] = {"status": "ok", "seconds": time.perf_counter() - t}
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, NotAvailable):
            reason = "%s: %s" % (type(e).__name__, reason)
            traceback.print_exc(file=sys.stderr)
        r["stages"][name] = {"status": "n/a", "reason": reason}
        for k in STAGE_KEYS.get(name, []):
            r.setdefault(k, None)
            r["not_available"][k] = reason
    log("stage %s: %s (%.0f s)" % (name, r["stages"][name]["status"], time.perf_counter() - t))


def run(args):
    only = STAGES if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in only if s not in STAGES]
    if bad:
        raise SystemExit("bench: unknown stage(s) %s; choose from %s" % (", ".join(bad), ",".join(STAGES)))
    r = {"schema": 2, "quick": bool(args.quick), "repeat": 1 if args.quick else args.repeat,
         "label": args.label, "gpu": args.gpu, "loadavg_start": (loadavg() or [None])[0],
         "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": {}, "not_available": {},
         "targets": report.TARGETS, "report_s_per_iteration": report.REPORT_ITER_S}
    import caffe  # noqa: F401  (load Caffe's BLAS before the machine facts list it)
    tmp = tempfile.mkdtemp(prefix="tsfcn-bench-")
    try:
        ctx = Context(args, tmp, r)
        # The ceiling and the FLOPs first: every net figure is compared with them.
        for s in [s for s in STAGES if s in only and s != "machine"]:
            _run_stage(s, lambda: STAGE_FUNCS[s](ctx), r)
        if args.peer:
            folder = os.path.abspath(args.peer_dir)
            _run_stage("peer", lambda: {"peer": peer.export(ctx, folder, args.peer)}, r)
            if r["stages"]["peer"]["status"] != "ok":
                r["peer"] = {"status": "n/a", "reason": r["stages"]["peer"]["reason"]}
        if "machine" in only:
            r["machine"] = machine.machine_facts()
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
    return report.derive(r)


def parser():
    p = argparse.ArgumentParser(prog="python3 -m tools.bench", description=__doc__.split("\n\n")[0],
                                epilog="Stages: %s. Writes OUT (JSON), OUT with .md (the tables) and the "
                                       "profile figure; prints a table." % ", ".join(STAGES))
    p.add_argument("--out", default=os.path.join("bench", "results.json"), help="results JSON (default: %(default)s)")
    p.add_argument("--figure", help="the profile figure (default: %s beside OUT)" % report.FIGURE)
    p.add_argument("--gpu", type=int, default=None, help="GPU id for the net stages (default: CPU)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per figure after one warm-up (default: 3)")
    p.add_argument("--only", help="comma-separated stages to run (default: all)")
    p.add_argument("--peer", choices=PEERS, help="export the train net for a peer framework (make bench PEER=torch)")
    p.add_argument("--peer-dir", default=PEER_DIR, help="where --peer exports (default: %(default)s)")
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
    r["command"] = "python3 -m tools.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    md = report.write(r, args.out)
    fig = None
    if r.get("profile"):
        fig = figure.draw(r, args.figure or os.path.join(os.path.dirname(args.out), report.FIGURE))
    print(report.table(r))
    if r.get("outputs_max_abs_diff"):
        print("outputs vs %s: max abs diff %s" % (args.compare, r["outputs_max_abs_diff"]))
    print("wrote %s and %s%s" % (args.out, md, " and %s" % fig if fig else ""))
    if (r.get("peer") or {}).get("status") == "exported":
        print("the PyTorch peer's input is in %s: `python3 -m tools.bench.peer_host --results %s` runs it"
              % (os.path.relpath(r["peer"]["dir"], REPO) if r["peer"]["dir"].startswith(REPO) else r["peer"]["dir"],
                 args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
