"""solver/make_solver.py: SPEC §4's schedule from a fold's counts; `caffe train -solver` runs it as written."""
import math
import os
import re
import subprocess

import caffe
from caffe import layers as L
import pytest

import paper
import tiny_data
from solver import make_solver, profiles


def test_paper_schedule_from_counts(tmp_path):
    tiny_data.make(str(tmp_path / "data"), patients=5, slices=3)
    epoch = make_solver.epoch_size(str(tmp_path / "data"), 0)
    assert epoch == 4 * 3 * paper.AUGMENTATIONS          # the other four patients' augmented slices
    s = make_solver.solver_parameter("/abs/train.prototxt", epoch, "/abs/run/snap", "paper", gpu=True, seed=7)
    assert s.type == "Adam" and s.base_lr == pytest.approx(paper.BASE_LR)
    assert (s.momentum, s.momentum2) == pytest.approx((paper.MOMENTUM, paper.MOMENTUM2))
    assert s.delta == pytest.approx(paper.DELTA) and s.weight_decay == pytest.approx(paper.WEIGHT_DECAY)
    assert s.lr_policy == "step" and s.gamma == pytest.approx(paper.LR_GAMMA)
    assert s.stepsize == math.ceil(epoch / 4)
    assert s.max_iter == paper.EPOCHS * epoch and s.snapshot == epoch
    assert s.solver_mode == s.GPU and s.random_seed == 7
    # the step policy: x0.9 four times per epoch
    assert make_solver.learning_rate(s, epoch) == pytest.approx(paper.BASE_LR * paper.LR_GAMMA ** 4)
    path = str(tmp_path / "solver.prototxt")
    make_solver.write(path, s, "# header")
    assert make_solver.read(path) == s
    # two images per update (batch x iter_size) halve the epoch's updates
    assert make_solver.epoch_size(str(tmp_path / "data"), 0, images_per_iteration=2) == epoch // 2


def test_profile_settings_reach_the_solver():
    p = profiles.settings("fast")
    p.update(lr_policy="poly", power=2.0, iter_size=3, momentum2=0.99, max_iter=100)
    s = make_solver.solver_parameter("train.prototxt", 1000, "snap", p)
    assert s.lr_policy == "poly" and s.power == 2.0 and s.iter_size == 3
    assert s.momentum2 == pytest.approx(0.99) and s.max_iter == 100
    assert make_solver.learning_rate(s, 50) == pytest.approx(p["base_lr"] * 0.25)
    assert make_solver.learning_rate(s, 100) == 0
    p.update(lr_policy="cosine")
    with pytest.raises(ValueError):
        make_solver.solver_parameter("train.prototxt", 1000, "snap", p)
    with pytest.raises(KeyError):
        profiles.PROFILES["bad"] = {"no_such_key": 1}
        try:
            profiles.settings("bad")
        finally:
            del profiles.PROFILES["bad"]


def _tiny_net(path):
    n = caffe.NetSpec()
    n.data, n.label = L.HDF5Data(source="train.txt", batch_size=1, ntop=2)
    n.score = L.Convolution(n.data, num_output=2, kernel_size=3, pad=1, weight_filler=dict(type="msra"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    with open(path, "w") as f:
        f.write(str(n.to_proto()))


def test_caffe_train_runs_the_written_solver(tmp_path):
    data = tiny_data.make(str(tmp_path / "data"), patients=5, slices=1, size=20)
    run = tmp_path / "run"
    run.mkdir()
    _tiny_net(str(run / "train.prototxt"))
    s = make_solver.solver_parameter(str(run / "train.prototxt"), 8, str(run / "snap"), "paper", max_iter=4)
    s.snapshot = 2
    s.display = 1
    make_solver.write(str(run / "solver.prototxt"), s)
    r = subprocess.run(["caffe", "train", "-solver", str(run / "solver.prototxt")],
                       cwd=os.path.join(data, "fold0"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=120,
                       env=dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0"))
    assert r.returncode == 0, r.stdout[-2000:]
    for it in (2, 4):
        assert (run / ("snap_iter_%d.caffemodel" % it)).exists()
        assert (run / ("snap_iter_%d.solverstate" % it)).exists()
    assert "Optimization Done" in r.stdout
    # Caffe's own lr at iteration 3 (stepsize ceil(8/4) = 2): base_lr * 0.9
    lr3 = float(re.search(r"Iteration 3, lr = ([0-9.e+-]+)", r.stdout).group(1))
    assert lr3 == pytest.approx(make_solver.learning_rate(s, 3)) == pytest.approx(paper.BASE_LR * paper.LR_GAMMA)


def test_fast_profile_schedule():
    p = profiles.settings("fast")
    max_iter, stepsize, snapshot, validate_every = make_solver.schedule(1408, "fast")
    assert max_iter == p["max_iter"] and snapshot == min(p["snapshot"], max_iter)
    assert validate_every == min(p["validate_every"], max_iter)
    # the narrow start runs the same schedule over its own iterations (tools/train.py's narrow_start)
    channels, narrow_iter, narrow_lr = p["narrow_start"]
    narrow = dict(p, max_iter=narrow_iter, base_lr=narrow_lr)
    assert make_solver.schedule(1408, narrow) == (narrow_iter, stepsize, p["snapshot"], p["validate_every"])
    assert narrow_lr > p["base_lr"] and channels < paper.FC6_CHANNELS
    fast = make_solver.solver_parameter("train.prototxt", 1408, "snap", "fast")
    assert fast.lr_policy == p["lr_policy"] == "poly" and fast.power == p["power"]
    assert make_solver.learning_rate(fast, max_iter) == 0          # decayed to nothing at the end
    paper_sp = make_solver.solver_parameter("train.prototxt", 1408, "snap", "paper")
    assert paper_sp.stepsize == math.ceil(1408 / 4) and paper_sp.gamma == pytest.approx(paper.LR_GAMMA)
    assert make_solver.schedule(1408, "paper") == (5 * 1408, 352, 1408, 141)
    with pytest.raises(KeyError):
        profiles.settings("nope")
