"""Helpers every bench module shares: timing medians, the load average, the n/a exception, paths."""
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY_PROTOTXT = os.path.join(REPO, "prototxt", "deploy.prototxt")


class NotAvailable(Exception):
    """A stage cannot run here (a module not written yet, no GPU, no package index, ...): reported as n/a."""


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
    """The 1-, 5- and 15-minute load averages, or None."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def threads():
    """The threads the BLAS (and so Caffe) uses: OPENBLAS_NUM_THREADS / OMP_NUM_THREADS, else the usable CPUs."""
    for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(key, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return len(os.sched_getaffinity(0))
