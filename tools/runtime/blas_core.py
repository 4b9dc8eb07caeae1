#!/usr/bin/env python3
"""Choose the OpenBLAS kernel set ("core") that Caffe and numpy run on, safely.

Debian 11's OpenBLAS 0.3.13 does not recognise recent CPUs and falls back to its generic kernels,
several times slower than the CPU allows. This module picks the best core the CPU's flags support
(AVX-512 -> SkylakeX, AVX2 -> Haswell, AVX -> Sandybridge), checks each candidate in a child process
(a float32 GEMM against a float64 reference; a crash or a wrong result rejects it), keeps the first that
passes, and caches the choice per CPU. ``TSFCN_BLAS_CORE`` overrides the choice (it is still checked,
and rejected with a warning if it fails).

    blas_core.py --env       print `export OPENBLAS_CORETYPE=...` for the shell (cached)
    blas_core.py --report    print the table of the cached choice (measuring once if needed)
    blas_core.py --refresh   re-measure every candidate and print the table (after each install)
    blas_core.py --json      the cached choice as JSON
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

# Best first. Each entry: OpenBLAS core name, the CPU flags it needs.
CANDIDATES = [
    ("SkylakeX", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}),
    ("Haswell", {"avx2", "fma"}),
    ("Sandybridge", {"avx"}),
]
GENERIC = "Prescott"
CHECK_TOLERANCE = 1e-5  # relative error of float32 GEMM against float64
CACHE = os.environ.get("TSFCN_BLAS_CACHE") or (
    "/var/cache/ts-fcn/blas-core.json" if os.geteuid() == 0
    else os.path.expanduser("~/.cache/ts-fcn/blas-core.json"))

# Runs in a child process with OPENBLAS_CORETYPE set: prints relative error and sgemm GFLOP/s.
_PROBE = r"""
import time, numpy as np
rng = np.random.default_rng(0)
n = 1024
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
ref = a.astype(np.float64) @ b.astype(np.float64)
c = a @ b
err = float(np.abs(c - ref).max() / np.abs(ref).max())
a @ b
times = []
for _ in range(5):
    t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
print(err, 2 * n ** 3 / sorted(times)[2] / 1e9)
"""


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def cpu_key():
    """Identifies the CPU (model and flags) so a cached choice is not reused on another machine."""
    flags = " ".join(sorted(cpu_flags()))
    return hashlib.sha256((cpu_model() + flags).encode()).hexdigest()[:16]


def probe(core):
    """(relative error, GFLOP/s) of sgemm with `core`, or None if the child crashed."""
    env = dict(os.environ, OPENBLAS_CORETYPE=core)
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    err, gflops = map(float, out.stdout.split())
    return err, gflops


def supported_candidates(flags):
    names = [name for name, need in CANDIDATES if need <= flags]
    return names + [GENERIC]


def choose(verbose=False):
    """Measure candidates best-first; return the cache record of the first that passes."""
    forced = os.environ.get("TSFCN_BLAS_CORE")
    order = supported_candidates(cpu_flags())
    if forced:
        order = [forced] + [c for c in order if c != forced]
    table = []
    chosen = None
    for core in order:
        result = probe(core)
        ok = result is not None and result[0] < CHECK_TOLERANCE
        table.append({"core": core, "ok": ok,
                      "rel_error": None if result is None else result[0],
                      "sgemm_gflops": None if result is None else round(result[1], 1)})
        if ok and chosen is None:
            chosen = table[-1]
            if not verbose:
                break
        elif forced and core == forced:
            print(f"[blas] TSFCN_BLAS_CORE={forced} failed the self-check; not used", file=sys.stderr)
    if chosen is None:  # even the generic core failed: leave OpenBLAS to its own detection
        chosen = {"core": None, "ok": False, "rel_error": None, "sgemm_gflops": None}
    return {"cpu_key": cpu_key(), "cpu_model": cpu_model(), "forced": forced or None,
            "core": chosen["core"], "sgemm_gflops": chosen["sgemm_gflops"],
            "threads": os.cpu_count(), "candidates": table}


def load_json(path, **expected):
    """A cached record, or None when it is absent, unreadable, or was made for other settings (any field
    differing from `expected`)."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if all(rec.get(k) == v for k, v in expected.items()) else None


def load_cache():
    return load_json(CACHE, cpu_key=cpu_key(), forced=os.environ.get("TSFCN_BLAS_CORE") or None)


def save_json(path, rec):
    """Write a cache record atomically; a read-only location only costs a re-check next time."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp%d" % os.getpid()
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def save_cache(rec):
    save_json(CACHE, rec)


def current(refresh=False, verbose=False):
    rec = None if refresh else load_cache()
    if rec is None:
        rec = choose(verbose=verbose)
        save_cache(rec)
    return rec


def choice_parser(description):
    """The command line of a cached runtime choice (this module's and parallel_math's): one of --env,
    --report, --refresh, --json."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--env", action="store_true", help="print the shell export lines (cached)")
    g.add_argument("--report", action="store_true", help="print the cached choice (measuring once if needed)")
    g.add_argument("--refresh", action="store_true", help="measure again and print the choice")
    g.add_argument("--json", action="store_true", help="print the cached choice as JSON")
    return ap


def main(argv=None):
    args = choice_parser(__doc__).parse_args(argv)
    if os.environ.get("OPENBLAS_CORETYPE") and args.env:
        print("export OPENBLAS_CORETYPE=%s" % os.environ["OPENBLAS_CORETYPE"])  # the user set it
        return
    rec = current(refresh=args.refresh, verbose=args.refresh or args.report)
    if args.env:
        if rec["core"]:
            print("export OPENBLAS_CORETYPE=%s" % rec["core"])
    elif args.json:
        print(json.dumps(rec, indent=1))
    else:
        print(f"[blas] CPU: {rec['cpu_model']}, {rec['threads']} threads")
        for row in rec["candidates"]:
            err = "crashed" if row["rel_error"] is None else "rel. error %.1e" % row["rel_error"]
            speed = "" if row["sgemm_gflops"] is None else "%7.1f GFLOP/s" % row["sgemm_gflops"]
            print(f"[blas]   {row['core']:<12} {'pass' if row['ok'] else 'FAIL'}  {err:<18} {speed}")
        print(f"[blas] chosen core: {rec['core']} ({rec['sgemm_gflops']} GFLOP/s sgemm)")


if __name__ == "__main__":
    main()
