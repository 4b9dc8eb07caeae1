"""tools/train.py + tools/evaluate.py in real Caffe: learning, interruption and resume, caffe test.

The nets are the TS-FCN built by prototxt/net.py with narrow fc6/fc7 (--fc-channels) so that a
training iteration costs well under a second on 2 cores; everything else (Python loss layer,
DiceCounts, crop, solver, snapshots) is the real thing.
"""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import paper
import tiny_data
from solver import make_solver

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["-m", "tools.train"]


def _rows(run):
    path = os.path.join(run, "train_log.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _train_cmd(data, run, *extra):
    return [sys.executable] + TRAIN + ["--fold", "0", "--data", data, "--run", run, "--fc-channels", "16",
            "--quiet"] + list(extra)


def _wait_for_iteration(proc, run, it, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        rows = _rows(run)
        if rows and int(rows[-1]["iteration"]) >= it:
            return int(rows[-1]["iteration"])
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    raise AssertionError("no iteration %d within %d s" % (it, timeout))


def test_interrupt_kill_and_resume_keep_iteration_and_lr(tmp_path):
    # 4 training patients x 1 slice x 8 = epoch 32, stepsize 8: lr drops by 0.9 at iteration 8.
    data = tiny_data.make(str(tmp_path / "data"), patients=5, slices=1, size=paper.INPUT_SIZE)
    run = str(tmp_path / "run")
    base = ["--profile", "paper", "--max-iter", "11", "--validate-every", "1", "--snapshot-every", "3"]
    env = dict(os.environ, GLOG_minloglevel="0")
    # 1. Ctrl-C: snapshot where it stopped, exit 130.
    p = subprocess.Popen(_train_cmd(data, run, *base), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True)
    _wait_for_iteration(p, run, 2)
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130, out[-3000:]
    stopped = int(re.search(r"stopped at iteration (\d+)", out).group(1))
    assert stopped >= 2
    assert os.path.exists(os.path.join(run, "snapshots", "ts_fcn_iter_%d.solverstate" % stopped))
    # 2. resume, then a hard kill (no chance to snapshot) after the periodic snapshot at 6.
    p = subprocess.Popen(_train_cmd(data, run, *base), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True)
    _wait_for_iteration(p, run, 7)
    p.kill()
    out = p.communicate(timeout=60)[0]
    assert "resumed from snapshots/ts_fcn_iter_%d.solverstate" % stopped in out
    assert os.path.exists(os.path.join(run, "snapshots", "ts_fcn_iter_6.solverstate"))
    # --keep-snapshots 1 (the default): the older snapshot went once 6 was written.
    assert _snapshot_iterations(run) == [6], os.listdir(os.path.join(run, "snapshots"))
    # 3. resume from iteration 6 with Caffe's own log on: its iterations and lr continue the schedule;
    #    --keep-snapshots 0 keeps every snapshot.
    r = subprocess.run(_train_cmd(data, run, *(base + ["--display", "1", "--keep-snapshots", "0"])),
                       stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "resumed from snapshots/ts_fcn_iter_6.solverstate" in r.stdout
    caffe_lr = {int(i): float(lr) for i, lr in re.findall(r"Iteration (\d+), lr = ([0-9.e+-]+)", r.stdout)}
    assert sorted(caffe_lr) == list(range(6, 11)), r.stdout[-3000:]   # iterations 6..10 ran, not 0..
    sp = make_solver.read(os.path.join(run, "solver.prototxt"))
    assert sp.stepsize == 8
    for it, lr in caffe_lr.items():
        want = paper.BASE_LR * (paper.LR_GAMMA if it >= 8 else 1.0)
        assert lr == pytest.approx(want, rel=1e-6), (it, lr)
    rows = _rows(run)
    iters = [int(x["iteration"]) for x in rows]
    assert iters == sorted(set(iters)) and iters[-1] == 11 and iters[0] == 0   # no duplicate after the kill
    assert float(rows[-1]["lr"]) == pytest.approx(paper.BASE_LR * paper.LR_GAMMA)
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["iterations"] == 11 and metrics["profile"] == "paper"
    assert _snapshot_iterations(run) == [6, 9, 11]
    # final.caffemodel is the last snapshot's file itself (a hard link: no second copy on disk).
    assert os.path.samefile(os.path.join(run, "final.caffemodel"),
                            os.path.join(run, "snapshots", "ts_fcn_iter_11.caffemodel"))


def _snapshot_iterations(run):
    """The iterations of RUN/snapshots with a caffemodel and a solverstate."""
    names = os.listdir(os.path.join(run, "snapshots"))
    return sorted(int(m.group(1)) for m in (re.match(r"ts_fcn_iter_(\d+)\.solverstate$", n) for n in names)
                  if m and "ts_fcn_iter_%s.caffemodel" % m.group(1) in names)


def _train_phantoms(data, run, fold, *extra, timeout=300):
    """tools/train.py on the phantom_run data (fast profile, fc6/fc7 256 wide); fails the test on a non-zero exit."""
    r = subprocess.run([sys.executable] + TRAIN + ["--fold", str(fold), "--data", data, "--run", run, "--profile",
                                                   "fast", "--fc-channels", "256", "--quiet"] + list(extra),
                       stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:]


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """Five small phantom patients (256x256) through make data, and a short fast-profile run on fold 3."""
    from data_prep import make_data, phantoms
    root = tmp_path_factory.mktemp("phantom_run")
    raw, data, run = str(root / "raw"), str(root / "data"), str(root / "run")
    phantoms.write_cohort(raw, n=5, seed=0, jobs=1, size=256, progress=False)
    make_data.run(raw, data, n_folds=5, seed=0, jobs=1)
    fold = 4   # validation patient P005: the largest tumor of the five
    # the report's weights (so that the two decision rules differ, test_caffe_test_...), read by argmax: 48
    # iterations of a narrow net are too few for the prior rule (p > 0.96) to call any tumor
    _train_phantoms(data, run, fold, "--base-lr", "1e-4", "--max-iter", "48", "--validate-every", "24",
                    "--class-weights", "0.04", "0.96", "--decision", "argmax", timeout=600)
    return data, run, fold


def test_short_training_learns(phantom_run):
    data, run, fold = phantom_run
    rows = _rows(run)
    assert [int(r["iteration"]) for r in rows] == [0, 24, 48]
    # the loss falls: the weighted loss on the fixed validation slices (the mean training loss of 12
    # batch-1 iterations on shuffled images is too noisy to compare)
    val_losses = [float(r["val_loss"]) for r in rows]
    assert val_losses[-1] < 0.9 * val_losses[0], val_losses
    assert all(np.isfinite(float(r["train_loss"])) for r in rows[1:])
    dice = [float(r["val_mean_dice_3d"]) for r in rows]
    assert dice[-1] > dice[0] + 0.05, dice                                 # beats the untrained net
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert m["profile"] == "fast" and m["iterations"] == 48
    assert m["mean_dice_3d"] == pytest.approx(dice[-1], abs=1e-4)
    # Fig. 5 draws the validation patients' curves and their mean, and nothing else of the log
    from tools import figures
    it, curves, mean = figures.fig5_curves(os.path.join(run, "train_log.csv"))
    assert it == [0, 24, 48] and mean == pytest.approx(dice)
    assert sorted(curves) == sorted(m["per_patient"]) == ["P005"]
    assert os.path.getsize(os.path.join(run, "figures", "fig5_val_dice.png")) > 10000
    # calibration and the resolution ceiling, per patient and per validation point
    s = m["per_patient"]["P005"]
    assert s["pred_ratio"] == pytest.approx(s["predicted"] / s["truth"])
    assert s["recall"] == pytest.approx(s["intersection"] / s["truth"])
    assert 0.85 < s["ceiling_dice_3d"] <= 1 and m["ceiling_dice_3d"] == s["ceiling_dice_3d"]
    assert float(rows[-1]["val_pred_ratio"]) == pytest.approx(s["pred_ratio"], abs=1e-4)


def test_caffe_test_with_python_layers_matches_the_evaluator(phantom_run):
    """`caffe test` on the val net (Python loss + DiceCounts) counts exactly what the pycaffe evaluator counts."""
    from tools import evaluate
    data, run, fold = phantom_run
    predicted = {}
    for decision in ("prior", "argmax"):      # both decision rules (tools/score.py), the run's last
        m = evaluate.evaluate(data, fold, run, figures=decision == "argmax", decision=decision)
        assert m["decision"] == decision
        ct = m["caffe_test"]
        n = ct["iterations"]
        per = m["per_patient"]
        for top, key in (("dice_intersection", "intersection"), ("dice_predicted", "predicted"),
                         ("dice_truth", "truth")):
            assert ct[top] * n == pytest.approx(sum(s[key] for s in per.values()), abs=0.5 + 1e-4 * ct[top] * n)
        assert ct["pooled_dice"] == pytest.approx(m["pooled_dice"], abs=1e-3)
        assert ct["loss"] > 0
        predicted[decision] = sum(s["predicted"] for s in per.values())
    assert predicted["prior"] < predicted["argmax"]     # p > 0.96 calls fewer pixels tumor than p > 0.5
    for name in ("fig_panels_best.png", "fig_panels_worst.png", "fig7_score_to_probability.png",
                 "dice_2d_hist.png"):
        assert os.path.getsize(os.path.join(run, "figures", name)) > 10000
    with open(os.path.join(run, "per_patient.csv")) as f:
        assert len(list(csv.DictReader(f))) == len(per) == 1


def test_weights_are_transplanted(phantom_run, tmp_path):
    """--weights: conv1_1..conv3_2 come from the caffemodel (tools/surgery.py), the rest stays MSRA."""
    import caffe
    data, run, fold = phantom_run
    src = os.path.join(run, "final.caffemodel")
    run2 = str(tmp_path / "run2")
    _train_phantoms(data, run2, fold, "--max-iter", "1", "--base-lr", "1e-12", "--weights", src)
    m = json.load(open(os.path.join(run2, "metrics.json")))
    assert m["weights"].startswith("conv1_1,conv1_2,conv2_1,conv2_2,conv3_1,conv3_2 from final.caffemodel")
    a = caffe.Net(os.path.join(run, "deploy.prototxt"), caffe.TEST, weights=src)
    b = caffe.Net(os.path.join(run2, "deploy.prototxt"), caffe.TEST, weights=os.path.join(run2, "final.caffemodel"))
    for name in paper.PRETRAINED_LAYERS:
        assert abs(a.params[name][0].data - b.params[name][0].data).max() < 1e-6
    assert abs(a.params["fc6"][0].data - b.params["fc6"][0].data).max() > 1e-3


def test_class_weights_option_reaches_the_caffe_loss(phantom_run, tmp_path):
    """--class-weights BG TUMOR: recorded in run.json, and Caffe's loss layer of the run's nets uses them."""
    import caffe
    import weighted_loss
    data, run, fold = phantom_run
    run2 = str(tmp_path / "balanced")
    _train_phantoms(data, run2, fold, "--max-iter", "1", "--class-weights", "0.5", "0.5")
    info = json.load(open(os.path.join(run2, "run.json")))
    assert info["net"]["class_weights"] == [0.5, 0.5]
    assert "class_weights" not in json.load(open(os.path.join(run, "run.json")))["net"]   # default: not recorded
    cwd = os.getcwd()
    os.chdir(os.path.join(data, "fold%d" % fold))      # the val net's HDF5 list is relative to the fold
    try:
        net = caffe.Net(os.path.join(run2, "val.prototxt"), caffe.TEST,
                        weights=os.path.join(run2, "final.caffemodel"))
        net.forward()
    finally:
        os.chdir(cwd)
    scores, labels = net.blobs["score_crop"].data, net.blobs["label"].data
    balanced = weighted_loss.weighted_loss(scores, labels, [0.5, 0.5])[0]
    report = weighted_loss.weighted_loss(scores, labels, paper.CLASS_WEIGHTS)[0]
    assert float(net.blobs["loss"].data) == pytest.approx(balanced, rel=1e-4)
    assert abs(balanced - report) > 1e-3 * balanced


def test_weight_average_is_kept_resumed_and_becomes_the_model(tmp_path):
    """--average: the EMA of the weights is saved beside each snapshot, carried across an interruption, and
    final.caffemodel is it: avg_4 = d avg_3 + (1 - d) raw_4, d = min(decay, 5 / 14) after the 4th update."""
    import caffe
    data = tiny_data.make(str(tmp_path / "data"), patients=5, slices=1, size=paper.INPUT_SIZE)
    run = str(tmp_path / "run")
    cmd = _train_cmd(data, run, "--profile", "fast", "--max-iter", "4", "--validate-every", "2",
                     "--snapshot-every", "2", "--average", "0.5", "--base-lr", "1e-3",
                     "--keep-snapshots", "0")               # the check below reads the snapshot of iteration 3
    r = subprocess.run(cmd + ["--stop-after", "3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=300)
    assert r.returncode == 130, r.stdout[-3000:]
    snaps = os.path.join(run, "snapshots")
    assert os.path.exists(os.path.join(snaps, "ts_fcn_iter_3.average.caffemodel"))
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "weights averaged (EMA 0.5)" in r.stdout
    deploy = os.path.join(run, "deploy.prototxt")
    load = lambda name: caffe.Net(deploy, caffe.TEST, weights=os.path.join(run, name)).params["fc6"][0].data.copy()
    final, raw4 = load("final.caffemodel"), load("snapshots/ts_fcn_iter_4.caffemodel")
    avg3 = load("snapshots/ts_fcn_iter_3.average.caffemodel")
    d = min(0.5, 5.0 / 14.0)
    assert np.abs(final - (d * avg3 + (1 - d) * raw4)).max() < 1e-6
    assert np.abs(final - raw4).max() > 1e-5
    assert json.load(open(os.path.join(run, "run.json")))["average"] == 0.5


def test_narrow_start_trains_widens_and_resumes(tmp_path):
    """--narrow-start C,N,LR: a run of its own in RUN/narrow (C fc channels, N iterations at LR), widened into the net
    (the widened start scores what the narrow run ended with), then the net's own iterations; a rerun
    resumes without training either again."""
    # folders with a space and a non-ASCII letter: Caffe splits its HDF5 lists at whitespace
    data = tiny_data.make(str(tmp_path / "my data é"), patients=5, slices=1, size=paper.INPUT_SIZE)
    run = str(tmp_path / "run ü")
    cmd = _train_cmd(data, run, "--profile", "fast", "--max-iter", "2", "--validate-every", "2",
                     "--narrow-start", "8,3,1e-3", "--sampling", "patient")
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    narrow = os.path.join(run, "narrow")
    assert json.load(open(os.path.join(narrow, "metrics.json")))["iterations"] == 3
    assert "num_output: 8" in open(os.path.join(narrow, "deploy.prototxt")).read()
    assert "num_output: 16" in open(os.path.join(run, "deploy.prototxt")).read()
    assert "widened (fc6,fc7,score) from the narrow start narrow" in r.stdout
    wide_rows, narrow_rows = _rows(run), _rows(narrow)
    assert [int(x["iteration"]) for x in wide_rows] == [0, 2]
    assert [int(x["iteration"]) for x in narrow_rows][-1] == 3
    assert float(wide_rows[0]["val_loss"]) == pytest.approx(float(narrow_rows[-1]["val_loss"]), rel=0.05)
    assert json.load(open(os.path.join(run, "run.json")))["narrow_start"] == [8, 3, 1e-3]
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert m["iterations"] == 2 and m["narrow_start"]["iterations"] == 3 and m["narrow_start"]["fc_channels"] == 8
    from tools import figures      # Fig. 5 draws the narrow start's curve first
    from tools.bench.nets import read_netparam
    n_it, _, n_mean = figures.fig5_curves(os.path.join(narrow, "train_log.csv"))
    assert n_it[-1] == 3 and os.path.getsize(os.path.join(run, "figures", "fig5_val_dice.png")) > 10000
    assert json.load(open(os.path.join(narrow, "run.json")))["base_lr"] == pytest.approx(1e-3)
    for folder in (run, narrow):    # --sampling reaches both phases: their train nets read the balanced list
        assert json.load(open(os.path.join(folder, "run.json")))["sampling"] == "patient"
        source = os.path.join(folder, "train_patient_balanced.txt")
        net = read_netparam(os.path.join(folder, "train.prototxt"))   # (the text escapes non-ASCII letters)
        assert [layer.hdf5_data_param.source for layer in net.layer if layer.type == "HDF5Data"] == [source]
        assert len(open(source).read().split()) == 4      # the four training patients, one file each
    timing = json.load(open(os.path.join(run, "metrics.json")))["seconds_per_iteration"]
    assert timing > 0
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert r.returncode == 0 and "narrow start" not in r.stdout, r.stdout[-3000:]
    assert json.load(open(os.path.join(run, "metrics.json")))["seconds_per_iteration"] == timing   # not 0
