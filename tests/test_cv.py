"""tools/cv.py and tools/ablation.py: their tables and figures from run folders, and both end to end in real
Caffe on five small phantoms (narrow fc6/fc7, one or two iterations per run)."""
import json
import os
import subprocess
import sys

import pytest

import paper
from tools import ablation, cv



def _metrics(run, per, profile="fast", ceiling=0.95):
    from tools import score
    os.makedirs(run, exist_ok=True)
    m, sd = score.mean_sd(per.values())
    with open(os.path.join(run, "metrics.json"), "w") as f:
        json.dump({"mean_dice_3d": m, "sd_dice_3d": sd, "profile": profile, "iterations": 10,
                   "ceiling_dice_3d": ceiling, "mean_pred_ratio": 1.1,
                   "per_patient": {p: {"dice_3d": d, "ceiling_dice_3d": ceiling} for p, d in per.items()}}, f)


def test_a_stopped_training_run_ends_ablation_and_recipe_with_one_line(tmp_path, monkeypatch, capsys):
    """An interrupted train.py (exit 130) ends `make ablation` / `make recipe` with its exit status and one line
    saying the same command resumes, not a traceback."""
    monkeypatch.setattr(ablation.train_tool, "command",
                        lambda *args, **kw: [sys.executable, "-c", "raise SystemExit(130)"])
    with pytest.raises(SystemExit) as e:
        ablation.train(str(tmp_path / "data"), str(tmp_path / "run"), 0, "fast", 0, [])
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the training run %s stopped (exit status 130); the same command resumes it"
                   % (tmp_path / "run")]


def test_cv_table(tmp_path):
    runs = str(tmp_path)
    _metrics(os.path.join(runs, "fold0"), {"P001": 0.8, "P002": 0.6})
    _metrics(os.path.join(runs, "fold1"), {"P003": 0.9})
    t = cv.summarize([0, 1, 2], runs)
    assert t["folds"][2] == {"fold": 2, "missing": True}
    assert t["mean_over_folds"] == pytest.approx((0.7 + 0.9) / 2)
    assert t["sd_over_folds"] == pytest.approx(0.1414213562, abs=1e-8)
    assert t["mean_over_patients"] == pytest.approx(2.3 / 3) and t["patients"] == 3
    text = cv.markdown(t)
    assert "| 0 | 2 | 0.700 ± 0.141 | 0.600 | 0.950 | 74 % | 1.10 | 10 |" in text
    assert "| 2 | – | missing | – | – | – | – | – |" in text
    assert t["ceiling_over_patients"] == pytest.approx(0.95) and t["min_over_patients"] == 0.6
    assert "profile fast" in text
    assert t["folds"][0]["per_patient"] == {"P001": 0.8, "P002": 0.6}
    png = cv.figure(t, os.path.join(runs, "cv_dice.png"))
    with open(png, "rb") as f:
        first = f.read()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and len(first) > 10000
    with open(cv.figure(t, os.path.join(runs, "again.png")), "rb") as f:
        assert f.read() == first                         # fixed jitter: same numbers, same picture


def test_cv_over_seeds_table(tmp_path):
    """SEEDS: each seed's cross-validation in RUNS/seed<s>/, then mean ± sd over seeds (of each seed's mean over
    folds), per fold over seeds, and over every fold run; a missing run is named, not averaged in."""
    runs = str(tmp_path)
    for s, per_fold in ((0, (0.6, 0.8)), (1, (0.7, None)), (2, (0.5, 0.9))):
        for k, d in enumerate(per_fold):
            if d is not None:
                _metrics(os.path.join(cv.seed_runs(runs, s), "fold%d" % k), {"P%03d" % (k + 1): d})
    tables = {s: cv.summarize([0, 1], cv.seed_runs(runs, s)) for s in (0, 1, 2)}
    t = cv.summarize_seeds(tables)
    assert t["mean_over_seeds"] == pytest.approx((0.7 + 0.7 + 0.7) / 3) and t["sd_over_seeds"] == pytest.approx(0)
    assert t["mean_over_runs"] == pytest.approx((0.6 + 0.8 + 0.7 + 0.5 + 0.9) / 5) and t["runs"] == 5
    assert t["folds"][0]["mean_over_seeds"] == pytest.approx(0.6) and t["folds"][0]["sd_over_seeds"] == pytest.approx(0.1)
    assert t["folds"][1]["per_seed"] == {"0": 0.8, "1": None, "2": 0.9}
    text = cv.markdown_seeds(t)
    assert "| fold | seed 0 | seed 1 | seed 2 | over seeds |" in text
    assert "| 1 | 0.800 | missing | 0.900 | 0.850 ± 0.071 |" in text
    assert "| over folds | 0.700 ± 0.141 | 0.700 ± 0.000 | 0.700 ± 0.283 | |" in text
    assert cv.seed_runs(runs, None) == runs and [r[:2] for r in cv.tasks([0, 1], [3, 4], runs)] == \
        [(3, 0), (3, 1), (4, 0), (4, 1)]


def test_tumor_volume_from_crop_counts_and_geometry(tmp_path):
    """Tumor ml = truth crop pixels x (box_side / 100 x pixel mm)^2 x slice mm; the figure plots them."""
    data, runs = tmp_path / "data", str(tmp_path / "runs")
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"folds": [["P001"], ["P002"]], "patients": [
        {"id": "P001", "box_side": 200.0, "spacing": [2.5, 0.5, 0.5]},
        {"id": "P002", "box_side": 100.0, "spacing": [5.0, 0.8, 0.8]}]}))
    for k, pid, truth, d in ((0, "P001", 4000, 0.8), (1, "P002", 1000, 0.3)):
        _metrics(os.path.join(runs, "fold%d" % k), {pid: d})
        path = os.path.join(runs, "fold%d" % k, "metrics.json")
        m = json.load(open(path))
        m["per_patient"][pid]["truth"] = truth
        json.dump(m, open(path, "w"))
    table = cv.summarize([0, 1, 2], runs)
    v = cv.tumor_volumes_ml(table, str(data))
    assert v["P001"] == pytest.approx(4000 * (2 * 0.5) ** 2 * 2.5 / 1000)     # 10 ml
    assert v["P002"] == pytest.approx(1000 * 0.8 ** 2 * 5.0 / 1000)           # 3.2 ml
    png = cv.size_figure(table, v, os.path.join(runs, "size.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10000


def test_cv_commands_one_gpu_per_fold():
    train, ev = cv.fold_commands(3, "/d", "/r/fold3", "paper", "/w.caffemodel", gpu="1")
    assert train[:3] == [sys.executable, "-m", "tools.train"]
    assert train[3:] == ["--fold", "3", "--data", "/d", "--run", "/r/fold3", "--profile", "paper",
                         "--weights", "/w.caffemodel", "--gpu", "1"]
    assert ev[:3] == [sys.executable, "-m", "tools.evaluate"] and ev[-2:] == ["--gpu", "1"]


def test_cv_passes_train_args_to_every_fold(tmp_path, monkeypatch):
    """make cv TRAIN_ARGS='...' -> --train-args: split like a shell line and appended to each fold's train.py."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"folds": [["P001"], ["P002"]], "patients": []}))
    seen = {}

    def fake_run_folds(folds, data_dir, runs, profile, weights, gpus, force, extra=()):
        seen["extra"] = list(extra)
        for k in folds:
            _metrics(os.path.join(runs, "fold%d" % k), {"P%03d" % (k + 1): 0.5})
        return {k: 0 for k in folds}

    monkeypatch.setattr(cv, "run_folds", fake_run_folds)
    code = cv.main(["--data", str(data), "--folds", "2", "--runs", str(tmp_path / "runs"), "--max-iter", "3",
                    "--train-args", "--crop aligned --class-weights 0.5 0.5"])
    assert code == 0
    assert seen["extra"] == ["--max-iter", "3", "--crop", "aligned", "--class-weights", "0.5", "0.5"]
    train, _ = cv.fold_commands(0, "/d", "/r", "fast", extra=seen["extra"])
    from tools import train as train_tool
    a = train_tool.parser().parse_args(train[3:])
    assert a.crop == "aligned" and a.class_weights == [0.5, 0.5] and a.max_iter == 3


def test_ablation_table():
    rows = [{"variant": "baseline", "change": "defaults", "mean_dice_3d": 0.5, "sd_dice_3d": 0.1,
             "mean_dice_2d": 0.45, "mean_pixel_accuracy": 0.97, "iterations": 240}]
    text = ablation.markdown({"profile": "fast", "fold": 0, "seed": 0, "variants": rows})
    assert "| baseline | defaults | 0.500 ± 0.100 | 0.450 | 0.9700 | 240 |" in text
    assert [v[0] for v in ablation.VARIANTS] == ["baseline", "crop", "box", "loss", "resize", "weights"]


def test_ablation_variants_change_one_thing_each():
    """Each variant's train.py options parse and move exactly one setting away from the report's defaults."""
    from tools import train
    base = ["--fold", "0", "--data", "d", "--run", "r"]
    default = vars(train.parser().parse_args(base))
    changed = {}
    for name, _, data_args, extra in ablation.VARIANTS:
        a = vars(train.parser().parse_args(base + extra))
        diff = {k for k in a if a[k] != default[k]}
        changed[name] = diff | {o.lstrip("-") for o in data_args[::2]}
        if data_args:                      # a make_data option away from its default
            assert data_args[1] != {"--box": paper.DEFAULT_BOX_MODE, "--resize": paper.DEFAULT_RESIZE}[data_args[0]]
    assert changed == {"baseline": set(), "crop": {"crop"}, "box": {"box"}, "loss": {"loss_normalize"},
                       "resize": {"resize"}, "weights": {"class_weights"}}


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """Five small phantom patients (256x256), as `make phantoms` writes them."""
    from data_prep import phantoms
    root = tmp_path_factory.mktemp("cohort")
    phantoms.write_cohort(str(root / "raw"), n=5, seed=0, jobs=1, size=256, progress=False)
    return root


def _tool(name, *args, timeout=900):
    r = subprocess.run([sys.executable, "-m", "tools." + name[:-len(".py")]] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:]
    return r.stdout


def test_cv_end_to_end_in_caffe(tiny_cohort):
    """tools/cv.py for real: every fold trains (train.py) and is evaluated (caffe test), then the table;
    a rerun finds every fold done. Narrow fc6/fc7 (--train-args) keep it to seconds per fold."""
    from data_prep import make_data
    data, runs = str(tiny_cohort / "data"), str(tiny_cohort / "cv")
    make_data.run(str(tiny_cohort / "raw"), data, n_folds=5, seed=0, jobs=1)
    _tool("cv.py", "--data", data, "--runs", runs, "--profile", "fast", "--max-iter", "2",
          "--train-args", "--fc-channels 16 --quiet")
    table = json.load(open(os.path.join(runs, "cv.json")))
    assert [r["fold"] for r in table["folds"]] == [0, 1, 2, 3, 4] and table["patients"] == 5
    for k in range(5):
        m = json.load(open(os.path.join(runs, "fold%d" % k, "metrics.json")))
        assert m["iterations"] == 2 and m["profile"] == "fast"
        assert m["caffe_test"]["iterations"] == m["slices"]             # make eval's `caffe test` ran
        assert json.load(open(os.path.join(runs, "fold%d" % k, "run.json")))["net"].get("fc_channels") == 16
    assert table["mean_over_folds"] == pytest.approx(
        sum(r["mean_dice_3d"] for r in table["folds"]) / 5)
    for png in ("cv_dice.png", "cv_dice_vs_volume.png"):
        assert os.path.getsize(os.path.join(runs, png)) > 10000
    again = _tool("cv.py", "--data", data, "--runs", runs, "--profile", "fast", "--max-iter", "2")
    assert again.count("done already") == 5


def test_ablation_end_to_end_in_caffe(tiny_cohort):
    """tools/ablation.py for real: its own data per box mode, one short run per variant, one table."""
    out = str(tiny_cohort / "ablation")
    _tool("ablation.py", "--raw", str(tiny_cohort / "raw"), "--out", out, "--fold", "4", "--jobs", "1",
          "--max-iter", "1", "--train-args", "--fc-channels 16 --quiet")
    result = json.load(open(os.path.join(out, "ablation.json")))
    assert [r["variant"] for r in result["variants"]] == [v[0] for v in ablation.VARIANTS]
    assert all(r["iterations"] == 1 and r["profile"] == "fast" for r in result["variants"])
    nets = {v: json.load(open(os.path.join(out, v, "run.json")))["net"] for v, _, _, _ in ablation.VARIANTS}
    assert nets["crop"]["crop_mode"] == "aligned" and nets["baseline"]["crop_mode"] == "center"
    assert nets["loss"]["normalize"] is False and nets["weights"]["class_weights"] == [0.5, 0.5]
    for folder, key, value in (("data_default", "box", "patient"), ("data_box-slice", "box", "slice"),
                               ("data_default", "resize", "bilinear"), ("data_resize-antialias", "resize", "antialias")):
        assert json.load(open(os.path.join(out, folder, "manifest.json")))["params"][key] == value
    assert json.load(open(os.path.join(out, "box", "run.json")))["data"].endswith("data_box-slice")
    assert json.load(open(os.path.join(out, "resize", "run.json")))["data"].endswith("data_resize-antialias")
    assert os.path.getsize(os.path.join(out, "ablation_dice.png")) > 10000
    assert "| weights | class weights 0.5/0.5 |" in open(os.path.join(out, "ablation.md")).read()
