"""`make bench PEER=torch`, the host's side: run the PyTorch peer on the net that `python3 -m tools.bench
--peer torch` exported, and merge its timings (and the ratio Caffe/PyTorch) into the results.

PyTorch is no dependency of the toolkit: it is installed on demand, with this Python's pip from the package
index, into a cache folder (TSFCN_PEER_CACHE, default /var/cache/ts-fcn/peer-torch as root, else
~/.cache/ts-fcn/peer-torch; one sub-folder per Python version) and put on the path of the peer's child
process only. Without a package index (or pip) the peer says so and is skipped; the bench's own results
stand. Runs where `make` runs (this host): it needs no Caffe and imports no numpy itself.

    python3 -m tools.bench.peer_host [--results bench/results.json]
"""
import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys

from tools.bench import report
from tools.bench.common import REPO, loadavg

PACKAGES = ("torch", "numpy")
PIP_TIMEOUT_S = 30            # per connection: an unreachable index fails in seconds, not minutes
RUN_TIMEOUT_S = 1800


def say(msg):
    print("[peer] %s" % msg, file=sys.stderr, flush=True)


def cache_dir():
    base = os.environ.get("TSFCN_PEER_CACHE") or (
        "/var/cache/ts-fcn/peer-torch" if os.geteuid() == 0 else os.path.expanduser("~/.cache/ts-fcn/peer-torch"))
    return os.path.join(base, "py%d.%d" % sys.version_info[:2])


def _importable(path):
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.run([sys.executable, "-c", "import torch, numpy"], env=env, capture_output=True).returncode == 0


def ensure_torch(path=None):
    """(folder holding torch and numpy, None), or (None, why not). Installs once into the cache; a second
    bench waits for the first's install (a lock beside the folder)."""
    path = path or cache_dir()
    if os.path.isdir(path) and _importable(path):
        return path, None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(path) and _importable(path):
            return path, None
        return _install(path)


def _install(path):
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    say("installing PyTorch into %s with pip, once (PyPI's Linux wheel brings CUDA libraries the peer does "
        "not use: several GB)" % path)
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-warn-script-location",
           "--timeout", str(PIP_TIMEOUT_S), "--retries", "1", "--target", partial] + list(PACKAGES)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        lines = [l.strip() for l in (p.stderr + p.stdout).splitlines() if l.strip()]
        last = next((l for l in reversed(lines) if l.startswith("ERROR")), lines[-1] if lines else "no output")
        return None, "PyTorch could not be installed from the package index (pip: %s)" % last[:300]
    if not _importable(partial):
        shutil.rmtree(partial, ignore_errors=True)
        return None, "PyTorch was installed but does not import on this machine"
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)
    return path, None


def run_peer(folder, torch_path, threads):
    """The peer's result dict (tools/bench/peer_torch.py in a child process)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([torch_path, REPO]),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, "-m", "tools.bench.peer_torch", "--dir", folder], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "n/a", "reason": "the PyTorch peer failed: %s" % tail[:300]}
    with open(os.path.join(folder, "result.json")) as f:
        return json.load(f)


def peer_result(entry):
    """Run the peer for the results' "peer" entry; a skip is a result too."""
    if not entry or entry.get("status") != "exported":
        return entry or {"status": "n/a", "reason": "no peer was exported (run python3 -m tools.bench --peer torch)"}
    folder = entry["dir"]
    try:
        with open(os.path.join(folder, "spec.json")) as f:
            threads = json.load(f)["threads"]
    except (OSError, ValueError, KeyError) as e:
        return {"status": "n/a", "reason": "the peer's export in %s cannot be read (%s)" % (folder, type(e).__name__)}
    torch_path, why = ensure_torch()
    if torch_path is None:
        return {"status": "n/a", "reason": why}
    say("timing the PyTorch peer (%d threads) ..." % threads)
    load = (loadavg() or [None])[0]
    out = run_peer(folder, torch_path, threads)
    out["loadavg_start"] = load
    out["note"] = ("The peer runs right after Caffe's stages, in the same `make bench`, on the threads Caffe "
                   "used (medians of as many runs); the ratio compares figures of one run")
    return out


def merge(results_path):
    """Run the peer for results_path's export, merge, rewrite results.json and .md; returns the results."""
    with open(results_path) as f:
        r = json.load(f)
    entry = r.get("peer")
    r["peer"] = peer_result(entry)
    if entry and entry.get("dir"):
        shutil.rmtree(entry["dir"], ignore_errors=True)   # the weights: hundreds of MB
    report.derive(r)
    report.write(r, results_path)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m tools.bench.peer_host", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join("bench", "results.json"),
                    help="the results of `python3 -m tools.bench --peer torch` (default: %(default)s)")
    args = ap.parse_args(argv)
    if not os.path.exists(args.results):
        raise SystemExit("peer: %s not found; run python3 -m tools.bench --peer torch first" % args.results)
    r = merge(args.results)
    for line in report.peer_lines(r):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
