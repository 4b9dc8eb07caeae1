"""The parallel element-wise math library (tools/runtime/caffe_parallel_math.cpp) against Debian's Caffe.

Each check trains in two child processes, one with Debian's libcaffe alone and one with the library
preloaded, and compares what comes out. The library is the one install-deps.sh built for the runtime.
"""
import json
import os
import subprocess
import sys

import pytest

from tools.runtime import parallel_math

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not os.path.exists(parallel_math.LIBRARY),
                                reason="the runtime has no parallel math library (native Caffe without it)")

# The TS-FCN itself (fc6/fc7 narrowed to 64 channels, no dropout: the net of the `fast` profile) with the
# Python loss, trained with the fast profile's Adam from the same MSRA start on the same images.
_TRAIN_TS_FCN = r"""
import json, os, sys, tempfile
import paper
from prototxt import net as ts_net
from solver import make_solver
from tools.cuda.gpu_proof import synthetic_h5, train_curve

iterations = int(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    source = synthetic_h5(tmp, 8, paper.INPUT_SIZE, seed=0)
    proto = ts_net.ts_fcn("train", train_source=source, fc_channels=64, dropout=0)
    proto.layer[0].hdf5_data_param.shuffle = False
    net_path = os.path.join(tmp, "train.prototxt")
    with open(net_path, "w") as f:
        f.write(str(proto))
    solver = make_solver.solver_parameter(net_path, epoch=8, snapshot_prefix=os.path.join(tmp, "s"),
                                          profile="fast", max_iter=iterations, display=0)
    solver.snapshot_after_train = False
    losses, _ = train_curve(net_path, iterations, None, solver=solver)
with open("/proc/self/maps") as f:
    preloaded = "libcaffe_parallel_math" in f.read()
print(json.dumps({"losses": losses, "preloaded": preloaded}))
"""


def _train(preload, iterations):
    env = dict(os.environ, **parallel_math.ENV)
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = parallel_math.LIBRARY
    out = subprocess.run([sys.executable, "-c", _TRAIN_TS_FCN, str(iterations)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ts_fcn_loss_curve_matches_debian_caffe():
    """The issue's criterion: the same loss curve over 50 iterations within 1e-4 relative, net without dropout."""
    debian, library = _train(False, 50), _train(True, 50)
    assert not debian["preloaded"] and library["preloaded"]
    assert len(debian["losses"]) == len(library["losses"]) == 50
    diff = parallel_math.max_relative_difference(debian["losses"], library["losses"])
    assert diff <= parallel_math.CHECK_TOLERANCE, diff
    # The curve is a training curve (the comparison is not between two constant losses).
    assert min(debian["losses"][-10:]) < 0.8 * debian["losses"][0]


def test_self_check_compares_real_runs(monkeypatch):
    """The runtime's self-check passes here, and rejects a library whose loss curve differs."""
    rec = parallel_math.choose()
    assert rec["ok"] and rec["max_rel_diff"] <= parallel_math.CHECK_TOLERANCE
    assert rec["update_s_debian"] > 0 and rec["update_s_library"] > 0
    real_probe = parallel_math.probe

    def drifting(preload):
        result = real_probe(preload)
        if preload:
            result["losses"][-1] *= 1 + 10 * parallel_math.CHECK_TOLERANCE
        return result
    monkeypatch.setattr(parallel_math, "probe", drifting)
    rec = parallel_math.choose()
    assert not rec["ok"] and not rec["use"] and "differ" in rec["reason"]
    assert parallel_math.env_lines(rec) == []


def test_turned_off_and_absent(monkeypatch, tmp_path):
    monkeypatch.setenv("TSFCN_PARALLEL_MATH", "0")
    assert not parallel_math.choose()["use"]
    monkeypatch.delenv("TSFCN_PARALLEL_MATH")
    monkeypatch.setattr(parallel_math, "LIBRARY", str(tmp_path / "absent.so"))
    rec = parallel_math.choose()
    assert not rec["use"] and "not built" in rec["reason"]


def test_runtime_commands_run_with_the_cached_choice():
    """What `make` runs sees LD_PRELOAD exactly when the cached choice says to use the library."""
    rec = parallel_math.current()
    assert parallel_math.env_lines(rec) == (
        ["export LD_PRELOAD=%s" % parallel_math.LIBRARY, "export OMP_WAIT_POLICY=PASSIVE"] if rec["use"] else [])
    if rec["use"]:
        assert os.environ.get("LD_PRELOAD") == parallel_math.LIBRARY
