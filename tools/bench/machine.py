"""The machine facts stored with every bench run: CPU, cores, load, BLAS library and core, threads, versions."""
import os
import platform

import numpy as np

from tools.bench.common import REPO, loadavg, threads


def blas_libraries():
    """The BLAS/LAPACK/OpenMP shared objects mapped into this process (after numpy and caffe are imported)."""
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
        "threads_used": threads(),
        "ld_preload": os.environ.get("LD_PRELOAD") or None,
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
    """HEAD of the checkout, read from .git (the runtime has no git; a worktree's .git is a file)."""
    try:
        git = os.path.join(REPO, ".git")
        if os.path.isfile(git):  # a worktree: "gitdir: <path>"
            with open(git) as f:
                git = f.read().split(":", 1)[1].strip()
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        common = git
        if os.path.exists(os.path.join(git, "commondir")):
            with open(os.path.join(git, "commondir")) as f:
                common = os.path.normpath(os.path.join(git, f.read().strip()))
        for base in (git, common):
            path = os.path.join(base, ref)
            if os.path.exists(path):
                with open(path) as f:
                    return f.read().strip()[:12]
        with open(os.path.join(common, "packed-refs")) as f:
            for line in f:
                if line.strip().endswith(" " + ref):
                    return line.split()[0][:12]
        return None
    except (OSError, IndexError):
        return None
