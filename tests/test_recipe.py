"""tools/recipe.py's summary of run folders: a run with a narrow start is read as one curve."""
import json
import os

from tools import caffe_net, recipe


def _log(path, points):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("iteration,lr,train_loss,val_mean_dice_3d,val_pred_ratio,P001\n")
        for it, dice in points:
            f.write("%d,0.1,0.5,%s,1.0,%s\n" % (it, dice, dice))
        f.write("%d,0.1,0.5,,,\n" % (points[-1][0] + 1))      # a row without a validation is left out


def test_narrow_start_then_widened_net_is_one_curve(tmp_path):
    run = str(tmp_path / "out" / "exp")
    _log(os.path.join(caffe_net.narrow_run(run), "train_log.csv"), [(0, 0.1), (400, 0.7), (800, 0.88)])
    _log(os.path.join(run, "train_log.csv"), [(0, 0.87), (50, 0.95), (100, 0.91)])
    with open(os.path.join(run, "run.json"), "w") as f:
        json.dump({"command": "python3 -m tools.train --seed 1", "decision": "argmax", "max_iter": 100}, f)
    rows = recipe.summarize(str(tmp_path / "out"))
    assert len(rows) == 1
    row = rows[0]
    assert row["curve"][0] == [0, 400, 800, 800, 850, 900]
    assert row["curve"][1] == [0.1, 0.7, 0.88, 0.87, 0.95, 0.91]
    assert (row["iterations"], row["final"], row["best"], row["best_at"]) == (900, 0.91, 0.95, 850)
    assert "| exp | 900 | **0.910** | 0.950 (850) |" in recipe.markdown(rows, "t")


def test_run_without_narrow_start_keeps_its_iterations(tmp_path):
    run = str(tmp_path / "out" / "plain")
    _log(os.path.join(run, "train_log.csv"), [(0, 0.1), (200, 0.6)])
    row = recipe.summarize(str(tmp_path / "out"))[0]
    assert row["curve"][0] == [0, 200] and row["iterations"] == 200


def test_seed_experiments_name_one_seed():
    """An experiment's own --seed replaces the study's (the train.py command names one seed, not two)."""
    options = dict((name, opts) for name, _, opts in recipe.EXPERIMENTS)
    assert recipe.split_seed(options["seed1"], 0) == (1, [])
    assert recipe.split_seed(options["image-sampling"], 3) == (3, ["--sampling", "image"])
    assert recipe.split_seed(["--max-iter", "5", "--seed", "2", "--quiet"], 0) == (2, ["--max-iter", "5", "--quiet"])
