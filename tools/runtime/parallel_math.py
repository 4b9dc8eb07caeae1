#!/usr/bin/env python3
"""Choose whether Caffe runs with the parallel element-wise math library, safely.

Debian's Caffe runs its element-wise vector math on one thread; the solver update of the TS-FCN is
made of it (Adam: seven passes over 68 M parameters plus a `powf` per parameter). The library built
from tools/runtime/caffe_parallel_math.cpp (by install-deps.sh, into LIBRARY) replaces those functions
through LD_PRELOAD with OpenMP-parallel versions, and Adam's powx(v, 0.5) with a square root. This module
decides, per CPU and library build, whether to use it:

  1. self-check: the same small net (no dropout) trained for CHECK_ITERATIONS Adam iterations in two
     child processes, with Debian's math and with the library; the loss curves must agree within
     CHECK_TOLERANCE (relative), and the library must actually be in use in the second child;
  2. speed: Adam updates of a 16.8 M-parameter layer, timed in both children, twice in turn, the fastest
     update of each kept (other processes only ever add time); the library is kept only when it passes and
     is faster.

The choice is cached (like the OpenBLAS core of blas_core.py). ``TSFCN_PARALLEL_MATH=0`` turns the
library off; ``=1`` keeps it whenever it passes the self-check, faster or not.

    parallel_math.py --env       print the shell export lines (LD_PRELOAD, OMP_WAIT_POLICY) (cached)
    parallel_math.py --report    print the cached choice (measuring once if needed)
    parallel_math.py --refresh   measure again and print the choice (after each install)
    parallel_math.py --json      the cached choice as JSON
"""
import hashlib
import json
import os
import subprocess
import sys

from tools.runtime import blas_core

LIBRARY = os.environ.get("TSFCN_PARALLEL_MATH_LIB", "/usr/local/lib/ts-fcn/libcaffe_parallel_math.so")
CHECK_ITERATIONS = 50
CHECK_TOLERANCE = 1e-4        # relative difference of any loss along the curve
MIN_SPEEDUP = 1.05            # below this the library is not worth loading
# OpenMP's idle threads sleep instead of spinning, so they do not take cycles from OpenBLAS's threads.
ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
CACHE = os.path.join(os.path.dirname(blas_core.CACHE), "parallel-math.json")

# Runs in a child process, with or without LD_PRELOAD: prints JSON {losses, update_s, preloaded}.
_PROBE = r"""
import json, os, sys, tempfile, time
import numpy as np
os.environ.setdefault("GLOG_minloglevel", "2")
import caffe
from caffe import layers as L, params as P

def solver_for(net, tmp, name):
    with open(os.path.join(tmp, name + ".prototxt"), "w") as f:
        f.write(str(net.to_proto()))
    with open(os.path.join(tmp, name + "_solver.prototxt"), "w") as f:
        f.write('net: "%s/%s.prototxt"\ntype: "Adam"\nbase_lr: 0.001\nmomentum: 0.9\nmomentum2: 0.999\n'
                'weight_decay: 0.0005\nlr_policy: "fixed"\nmax_iter: 1000\nrandom_seed: 0\n'
                'snapshot_prefix: "%s/s"\n' % (tmp, name, tmp))
    return caffe.get_solver(os.path.join(tmp, name + "_solver.prototxt"))

def check_net():
    # Parameter blobs above the library's 65536-element threshold, so its parallel paths run.
    n = caffe.NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[4, 1, 16, 16]), dict(dim=[4])], ntop=2)
    n.conv1 = L.Convolution(n.data, num_output=32, kernel_size=3, pad=1, weight_filler=dict(type="msra"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.conv2 = L.Convolution(n.relu1, num_output=256, kernel_size=3, pad=1, weight_filler=dict(type="msra"))
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.pool = L.Pooling(n.relu2, pool=P.Pooling.MAX, kernel_size=4, stride=4)
    n.fc = L.InnerProduct(n.pool, num_output=64, weight_filler=dict(type="msra"))
    n.relu3 = L.ReLU(n.fc, in_place=True)
    n.score = L.InnerProduct(n.relu3, num_output=2, weight_filler=dict(type="msra"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n

def speed_net():
    n = caffe.NetSpec()
    n.data, n.target = L.Input(shape=[dict(dim=[1, 4096]), dict(dim=[1, 4096])], ntop=2)
    n.fc = L.InnerProduct(n.data, num_output=4096, weight_filler=dict(type="gaussian", std=0.01))
    n.loss = L.EuclideanLoss(n.fc, n.target)
    return n

caffe.set_mode_cpu()
caffe.set_random_seed(0)
iterations = int(sys.argv[1])
rng = np.random.RandomState(0)
with tempfile.TemporaryDirectory() as tmp:
    s = solver_for(check_net(), tmp, "check")
    losses = []
    for _ in range(iterations):
        s.net.blobs["data"].data[...] = rng.randn(4, 1, 16, 16)
        s.net.blobs["label"].data[...] = rng.randint(0, 2, 4)
        losses.append(float(s.net.forward()["loss"]))
        s.net.backward()
        s.apply_update()
    s = solver_for(speed_net(), tmp, "speed")
    s.net.blobs["data"].data[...] = rng.randn(1, 4096)
    times = []
    for _ in range(5):
        s.net.forward(); s.net.backward()
        t = time.perf_counter(); s.apply_update(); times.append(time.perf_counter() - t)
with open("/proc/self/maps") as f:
    preloaded = "libcaffe_parallel_math" in f.read()
print(json.dumps({"losses": losses, "update_s": min(times), "preloaded": preloaded}))
"""


def library_key():
    """Identifies the CPU, the library build and libcaffe, so a cached choice is not reused elsewhere."""
    h = hashlib.sha256(blas_core.cpu_key().encode())
    for path in (LIBRARY, "/usr/lib/x86_64-linux-gnu/libcaffe.so.1.0.0"):
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(b"absent")
    return h.hexdigest()[:16]


def probe(preload):
    """The child's result dict, or None if it crashed or timed out."""
    env = dict(os.environ, **ENV)
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = LIBRARY
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, str(CHECK_ITERATIONS)], env=env,
                             capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def max_relative_difference(a, b):
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


def choose():
    """Run the self-check and the timing; return the cache record."""
    mode = os.environ.get("TSFCN_PARALLEL_MATH", "auto")
    rec = {"key": library_key(), "library": LIBRARY, "mode": mode, "use": False, "ok": False,
           "max_rel_diff": None, "update_s_debian": None, "update_s_library": None, "reason": ""}
    if mode == "0":
        rec["reason"] = "turned off (TSFCN_PARALLEL_MATH=0)"
        return rec
    if not os.path.exists(LIBRARY):
        rec["reason"] = "not built (%s absent)" % LIBRARY
        return rec
    debian, library = probe(False), probe(True)
    if debian is not None and library is not None:      # a second round in turn: load varies over time
        again = probe(False), probe(True)
        for first, second in zip((debian, library), again):
            if second is not None:
                first["update_s"] = min(first["update_s"], second["update_s"])
    if debian is None:
        rec["reason"] = "the self-check could not run Caffe"
        return rec
    if library is None or not library["preloaded"]:
        rec["reason"] = "Caffe crashed or did not load the library"
        return rec
    rec["max_rel_diff"] = max_relative_difference(debian["losses"], library["losses"])
    rec["update_s_debian"], rec["update_s_library"] = debian["update_s"], library["update_s"]
    rec["ok"] = len(debian["losses"]) == len(library["losses"]) == CHECK_ITERATIONS and \
        rec["max_rel_diff"] <= CHECK_TOLERANCE
    speedup = debian["update_s"] / library["update_s"]
    if not rec["ok"]:
        rec["reason"] = "loss curves differ by %.1e (> %.0e)" % (rec["max_rel_diff"], CHECK_TOLERANCE)
    elif mode == "1" or speedup >= MIN_SPEEDUP:
        rec["use"] = True
        rec["reason"] = "%.2fx faster Adam update" % speedup
    else:
        rec["reason"] = "no faster (%.2fx)" % speedup
    return rec


def load_cache():
    return blas_core.load_json(CACHE, key=library_key(), mode=os.environ.get("TSFCN_PARALLEL_MATH", "auto"))


def current(refresh=False):
    rec = None if refresh else load_cache()
    if rec is None:
        rec = choose()
        blas_core.save_json(CACHE, rec)
    return rec


def env_lines(rec):
    if not rec["use"] or os.environ.get("TSFCN_GPU"):  # a CUDA build of Caffe runs its own math
        return []
    return ["export LD_PRELOAD=%s" % LIBRARY] + ["export %s=%s" % kv for kv in ENV.items()]


def main(argv=None):
    args = blas_core.choice_parser(__doc__).parse_args(argv)
    rec = current(refresh=args.refresh)
    if args.env:
        print("\n".join(env_lines(rec)))
    elif args.json:
        print(json.dumps(rec, indent=1))
    else:
        if rec["max_rel_diff"] is not None:
            print("[math] self-check: %d Adam iterations, loss curves within %.1e of Debian's Caffe (limit %.0e); "
                  "update %.3f s -> %.3f s" % (CHECK_ITERATIONS, rec["max_rel_diff"], CHECK_TOLERANCE,
                                               rec["update_s_debian"], rec["update_s_library"]))
        print("[math] parallel element-wise math: %s (%s)" % ("on" if rec["use"] else "off", rec["reason"]))


if __name__ == "__main__":
    main()
