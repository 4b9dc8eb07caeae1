"""`make recipe`: the study behind the `fast` profile (docs/results/recipe.md).

Each experiment is one tools/train.py run on one fold with a fixed seed, validated at regular points (Dice
under both decision rules, precision, recall, predicted/true pixels: tools/train_log.py's columns), in
OUT/<name>; a finished run is reused and an interrupted one resumes (train.py). The summary reads every run
folder under OUT (also runs made by hand with train.py) and writes
  OUT/recipe.md          one row per run: its command, the final and best mean 3D Dice under the run's rule and
                         the other, calibration at the end, iterations (with a narrow start: its iterations and
                         the widened net's), wall seconds per iteration
  OUT/recipe_curves.png  mean validation 3D Dice against iterations, one curve per run (dashed: under the other
                         decision rule), the ceiling dotted

CLI: python3 -m tools.recipe --data DATA --out OUT [--fold 0] [--seed 0] [--only NAME ...] [--summarize-only]
"""
import argparse
import json
import os
import sys

import numpy as np

import atomic
from solver import profiles
from tools import ablation, caffe_net, train_log

FAST = profiles.settings("fast")
NARROW_CHANNELS, NARROW_ITER, NARROW_LR = FAST["narrow_start"]


def narrow(channels=NARROW_CHANNELS, iterations=NARROW_ITER, lr=NARROW_LR):
    """The --narrow-start option's value."""
    return "%d,%d,%g" % (channels, iterations, lr)


# name -> (what it changes against the fast profile, train.py options); each alone, on the same fold and seed
EXPERIMENTS = (
    ("fast", "the fast profile as it is", []),
    ("seed1", "the fast profile, Caffe seed 1 (run-to-run spread)", ["--seed", "1"]),
    ("seed2", "the fast profile, Caffe seed 2", ["--seed", "2"]),
    ("no-narrow-start", "the previous profile: the full net alone, 400 iterations at 1e-4",
     ["--narrow-start", "none", "--max-iter", "400", "--base-lr", "1e-4"]),
    ("wide-lr-1e-4", "the widened net trained at the narrow start's rate 1e-4", ["--base-lr", "1e-4"]),
    ("narrow-256", "a narrow start with 256 channels", ["--narrow-start", narrow(channels=256)]),
    ("long", "4x the iterations of both phases", ["--narrow-start", narrow(iterations=4 * NARROW_ITER),
                                                  "--max-iter", str(4 * FAST["max_iter"])]),
    ("report-weights", "the report's class weights 0.04/0.96, read at p > 0.96 (the prior shift undone)",
     ["--class-weights", "0.04", "0.96", "--decision", "prior"]),
    ("image-sampling", "every augmented image once per epoch (the report's), not every patient equally often",
     ["--sampling", "image"]),
    ("no-average", "the raw weights instead of their moving average", ["--average", "0"]),
    ("report-net", "the report's training net: dropout 0.5, conv1-3 at lr x0.1",
     ["--dropout", "0.5", "--pretrained-lr-mult", "0.1"]),
)


def split_seed(options, default):
    """(the experiment's Caffe seed: its --seed, else `default`; its other options), so that the train.py
    command names one seed."""
    options = list(options)
    if "--seed" not in options:
        return default, options
    i = options.index("--seed")
    return int(options[i + 1]), options[:i] + options[i + 2:]


def read_run(run):
    """(run.json, train_log rows, metrics.json or {}) of a run folder; None when it has no log. The rows are
    those with a validation; with a narrow start (RUN/narrow/) its rows come first and the widened net's
    iterations are counted on from its last, as Fig. 5 draws them."""
    log = os.path.join(run, "train_log.csv")
    if not os.path.exists(log):
        return None
    info = caffe_net.run_info(run)
    metrics = {}
    if os.path.exists(os.path.join(run, "metrics.json")):
        with open(os.path.join(run, "metrics.json")) as f:
            metrics = json.load(f)
    rows = train_log.validated_rows(log)
    narrow_log = os.path.join(caffe_net.narrow_run(run), "train_log.csv")
    if os.path.exists(narrow_log):           # a narrow start: its curve first, the widened net's counted on
        narrow_rows = train_log.validated_rows(narrow_log)
        offset = narrow_rows[-1]["iteration"] if narrow_rows else 0
        rows = narrow_rows + [dict(r, iteration=r["iteration"] + offset) for r in rows]
    return info, rows, metrics


def summary_row(name, info, rows, metrics):
    rule = info.get("decision", "argmax")
    other = "prior" if rule == "argmax" else "argmax"
    dice = [r["val_mean_dice_3d"] for r in rows]
    alt = [r.get("val_mean_dice_3d_" + other, float("nan")) for r in rows]
    last = rows[-1]
    nan = float("nan")                              # (logs of older versions lack the calibration columns)
    return {"name": name, "command": info.get("command", ""), "rule": rule, "iterations": int(last["iteration"]),
            "max_iter": info.get("max_iter"), "final": dice[-1], "best": max(dice),
            "best_at": int(rows[int(np.argmax(dice))]["iteration"]), "final_other": alt[-1], "other": other,
            "precision": last.get("val_precision", nan), "recall": last.get("val_recall", nan),
            "pred_ratio": last.get("val_pred_ratio", nan),
            "ceiling": metrics.get("ceiling_dice_3d", float("nan")),
            "s_per_it": metrics.get("seconds_per_iteration", float("nan")),
            "curve": ([r["iteration"] for r in rows], dice, alt)}


def summarize(out):
    rows = []
    for name in sorted(os.listdir(out)):
        got = read_run(os.path.join(out, name))
        if got and got[1]:
            rows.append(summary_row(name, *got))
    return rows


def markdown(rows, title):
    lines = ["# %s" % title, "",
             "Dice: mean validation 3D Dice over the fold's patients; 'other rule': the same net under the other "
             "decision rule (argmax / prior, tools/score.py); precision, recall, pred/true at the last point.", "",
             "| run | iterations | final Dice | best (at it.) | final, other rule | precision | recall | pred/true "
             "| s/it | command |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| %s | %d | **%.3f** | %.3f (%d) | %.3f (%s) | %.3f | %.3f | %.2f | %.2f | `%s` |" % (
            r["name"], r["iterations"], r["final"], r["best"], r["best_at"], r["final_other"], r["other"],
            r["precision"], r["recall"], r["pred_ratio"], r["s_per_it"], r["command"]))
    return "\n".join(lines) + "\n"


def curves_figure(rows, png, title):
    from tools import figures
    return figures.curves(png, [(r["name"],) + tuple(r["curve"]) for r in rows], title,
                          ceiling=next((r["ceiling"] for r in rows if not np.isnan(r["ceiling"])), None))


def main(argv=None):
    ap = argparse.ArgumentParser(description="The recipe study of the fast profile: each experiment a train.py run "
                                 "on one fold and seed; a table and the validation curves of every run in OUT.")
    ap.add_argument("--data", help="DATA folder (make data); needed unless --summarize-only")
    ap.add_argument("--out", required=True, help="folder of the runs and the summary")
    ap.add_argument("--profile", default="fast", choices=sorted(profiles.PROFILES))
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--validate-every", type=int, default=50)
    ap.add_argument("--only", nargs="*", choices=[e[0] for e in EXPERIMENTS], help="run only these experiments")
    ap.add_argument("--summarize-only", action="store_true", help="run nothing; summarize the runs in OUT")
    a = ap.parse_args(argv)
    out = os.path.abspath(a.out)
    if not a.summarize_only:
        if not a.data:
            ap.error("--data is needed to run experiments")
        for name, _, options in EXPERIMENTS:
            if not a.only or name in a.only:
                seed, options = split_seed(options, a.seed)
                ablation.train(os.path.abspath(a.data), os.path.join(out, name), a.fold, a.profile, seed,
                               ["--validate-every", str(a.validate_every), "--quiet"] + options)
    rows = summarize(out)
    if not rows:
        raise SystemExit("error: no run with a train_log.csv under %s" % out)
    title = "Recipe study of the %s profile: fold %d (each run's seed: its command)" % (a.profile, a.fold)
    atomic.write_text(os.path.join(out, "recipe.md"), markdown(rows, title))
    curves_figure(rows, os.path.join(out, "recipe_curves.png"), title)
    print(markdown(rows, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
