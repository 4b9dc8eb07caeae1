"""`make eval`: score a trained fold — `caffe test` on the val net, then the per-patient evaluator.

This module owns the evaluation of a trained run (the validation data and their scoring, which
tools/train.py shares, live in tools/validation.py; the net is opened and run by tools/caffe_net.py):
  1. prints and runs `caffe test -model RUN/val.prototxt -weights SNAPSHOT -iterations <validation
     images>` with cwd DATA/fold<k> (the val net's HDF5 list is relative to it) and reads the
     DiceCounts tops it prints: their means give the pooled Dice over all validation slices;
  2. the evaluator: a deploy net (same crop mode as the run) forwards the un-augmented validation
     slices in batches; tumor by the run's decision rule (tools/score.py: argmax, the report's, unless the
     run or --decision says prior); per-patient 3D Dice, per-slice 2D Dice, pixel accuracy, precision,
     recall, predicted/true pixels, and each patient's resolution ceiling (tools/ceiling.py), mean ± sd over
     patients -> RUN/metrics.json (merged) and RUN/per_patient.csv;
  3. figures in RUN/figures/ (tools/figures.py): Figs. 6/8/9 panels for the best, median and worst
     patients, Fig. 7 (15x15 tumor score -> upsampled -> probability), Fig. 5, a 2D-Dice histogram.

CLI: python3 -m tools.evaluate --fold K --data DATA --run RUN [--snapshot S] [--gpu ID]
SNAPSHOT defaults to RUN/final.caffemodel. Outputs carry the run's profile and only pseudonyms.
"""
import argparse
import csv
import io
import os
import re
import shlex
import subprocess
import time

import numpy as np

import atomic
import paper
from prototxt.net import DICE_TOPS
from tools import caffe_net, score, validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- caffe test -----------------------------------------------------------------------------------
def caffe_test_command(val_prototxt, weights, iterations, gpu=None):
    cmd = ["caffe", "test", "-model", val_prototxt, "-weights", weights, "-iterations", str(iterations)]
    if gpu is not None:
        cmd += ["-gpu", str(gpu)]
    return cmd


def parse_caffe_test(log):
    """{top: mean} of the scalar tops (loss, DiceCounts) from `caffe test` output lines such as
    '... dice_truth = 123.4' (per-pixel outputs such as prob are printed per element and skipped)."""
    out = {}
    for name, value in re.findall(r"\]\s+(\w+) = ([-+0-9.eE]+|nan|inf)", log):
        if name in DICE_TOPS or name == "loss":
            out[name] = float(value)
    return out


def caffe_test(val_prototxt, weights, iterations, cwd, gpu=None):
    """Run `caffe test` (printing the command); (parsed means, pooled Dice)."""
    cmd = caffe_test_command(val_prototxt, weights, iterations, gpu)
    print("$ (cd %s && %s)" % (shlex.quote(cwd), " ".join(shlex.quote(c) for c in cmd)), flush=True)
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")
    layers = os.path.join(REPO, "layers")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, layers, env.get("PYTHONPATH", "")) if p)
    r = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    if r.returncode != 0:
        tail = "\n".join(r.stdout.splitlines()[-15:])
        raise SystemExit("error: caffe test failed (exit %d):\n%s" % (r.returncode, tail))
    means = parse_caffe_test(r.stdout)
    missing = [t for t in DICE_TOPS if t not in means]
    if missing:
        raise SystemExit("error: caffe test printed no %s; is %s the val net with DiceCounts?"
                         % (", ".join(missing), val_prototxt))
    pooled = score.dice_from_counts(*(means[t] for t in DICE_TOPS))
    return means, pooled


# --- outputs ---------------------------------------------------------------------------------------
CSV_COLUMNS = ("slices", "dice_3d", "ceiling_dice_3d", "dice_2d_mean", "pixel_accuracy", "precision", "recall",
               "pred_ratio", "intersection", "predicted", "truth")


def per_patient_csv(path, per, profile):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(("patient",) + CSV_COLUMNS + ("profile",))
    for pid in sorted(per):
        s = per[pid]
        w.writerow([pid] + [("%.5f" % s[k]) if isinstance(s[k], float) else s[k] for k in CSV_COLUMNS] + [profile])
    atomic.write_text(path, buf.getvalue())


def table(per, summary):
    """The per-patient table as text: 3D Dice beside its ceiling, then calibration."""
    lines = ["%-8s %6s %8s %8s %8s %9s %7s %8s" % ("patient", "slices", "3D Dice", "ceiling", "2D mean",
                                                   "precision", "recall", "pred/true")]
    for pid in sorted(per):
        s = per[pid]
        lines.append("%-8s %6d %8.3f %8.3f %8.3f %9.3f %7.3f %8.2f" % (
            pid, s["slices"], s["dice_3d"], s.get("ceiling_dice_3d", float("nan")), s["dice_2d_mean"],
            s["precision"], s["recall"], s["pred_ratio"]))
    lines.append("mean 3D Dice %.3f ± %.3f over %d patients, %.0f%% of their mean ceiling %.3f (2D Dice %.3f ± %.3f "
                 "over %d slices; pixel accuracy %.4f; precision %.3f, recall %.3f, predicted/true %.2f)"
                 % (summary["mean_dice_3d"], summary["sd_dice_3d"], summary["patients"],
                    100 * summary["mean_dice_3d"] / summary.get("ceiling_dice_3d", float("nan")),
                    summary.get("ceiling_dice_3d", float("nan")),
                    summary["mean_dice_2d"], summary["sd_dice_2d"], summary["slices"],
                    summary["mean_pixel_accuracy"], summary["mean_precision"], summary["mean_recall"],
                    summary["mean_pred_ratio"]))
    return "\n".join(lines)


def ranked(per):
    """(best, median, worst) pseudonyms by 3D Dice."""
    ids = sorted(per, key=lambda p: (-per[p]["dice_3d"], p))
    return ids[0], ids[len(ids) // 2], ids[-1]


def make_figures(run, net, patients, per, profile, threshold=0.5, ceiling=None):
    """Figs. 5-9 and the 2D-Dice histogram into RUN/figures; returns the paths written."""
    from tools import figures
    out = os.path.join(run, "figures")
    written = []
    by_id = {p[0]: p for p in patients}
    for role, pid in zip(("best", "median", "worst"), ranked(per)):
        _, data, label, slices = by_id[pid]
        i = int(np.argmax(label.reshape(len(label), -1).sum(1)))    # the slice with most tumor
        blobs = caffe_net.forward(net, data[i:i + 1], ("score", "score_crop", "prob"))
        prob = blobs["prob"][0, paper.TUMOR]
        pred = score.predict(prob, threshold)
        d2 = score.dice(pred, label[i])
        path = os.path.join(out, "fig_panels_%s.png" % role)
        figures.panels(path, data[i], prob, pred, label[i],
                       "%s patient %s, slice %d: 2D Dice %.3f (patient 3D Dice %.3f) [%s]"
                       % (role, pid, int(slices[i]), d2, per[pid]["dice_3d"], profile), threshold)
        written.append(path)
        if role == "best":
            path = os.path.join(out, "fig7_score_to_probability.png")
            figures.fig7(path, data[i], blobs["score"][0, paper.TUMOR], blobs["score_crop"][0, paper.TUMOR],
                         prob, "patient %s, slice %d [%s]" % (pid, int(slices[i]), profile))
            written.append(path)
    path = os.path.join(out, "dice_2d_hist.png")
    figures.dice_histogram(path, [x for p in sorted(per) for x in per[p]["dice_2d"]],
                           [per[p]["dice_3d"] for p in sorted(per)], profile)
    written.append(path)
    log = os.path.join(run, "train_log.csv")
    if os.path.exists(log):
        path = os.path.join(out, "fig5_val_dice.png")
        figures.fig5(path, log, caffe_net.run_info(run).get("epoch"), profile, ceiling,
                     os.path.join(caffe_net.narrow_run(run), "train_log.csv"))
        written.append(path)
    return written


def evaluate(data_dir, fold, run, snapshot=None, gpu=None, batch=8, figures=True, run_caffe_test=True,
             decision=None):
    """The whole of `make eval`; returns the merged metrics dict. decision: the rule (tools/score.py),
    default the run's."""
    from prototxt import net as netdef
    run = os.path.abspath(run)
    data_dir = os.path.abspath(data_dir)
    info = caffe_net.run_info(run)
    profile = info.get("profile", "unknown")
    snapshot = os.path.abspath(snapshot or os.path.join(run, "final.caffemodel"))
    if not os.path.exists(snapshot):
        raise SystemExit("error: snapshot %s not found; train first (make train FOLD=%d)" % (snapshot, fold))
    mode = caffe_net.use_device(gpu)
    fold_dir = os.path.join(data_dir, "fold%d" % fold)
    net_kw = info.get("net", {})
    val_proto = os.path.join(run, "val.prototxt")
    deploy_proto = os.path.join(run, "deploy.prototxt")
    if not os.path.exists(val_proto):
        netdef.write(val_proto, split="val", **net_kw)
    if not os.path.exists(deploy_proto):
        netdef.write(deploy_proto, split="deploy", **net_kw)
    decision = decision or info.get("decision", score.DEFAULT_DECISION)
    threshold = score.tumor_threshold(decision, info.get("class_weights", paper.CLASS_WEIGHTS))
    if abs(net_kw.get("tumor_threshold", 0.5) - threshold) > 1e-9:     # another rule than the run's
        val_proto = netdef.write(os.path.join(run, "val_%s.prototxt" % decision), split="val",
                                 **dict(net_kw, tumor_threshold=threshold))
    patients = validation.load_patients(data_dir, fold)
    n_images = sum(len(p[1]) for p in patients)
    result = {"profile": profile, "fold": fold, "snapshot": os.path.relpath(snapshot, run), "mode": mode}
    if run_caffe_test:
        t0 = time.time()
        means, pooled = caffe_test(val_proto, snapshot, n_images, fold_dir, gpu)
        print("caffe test: %s; pooled Dice over %d validation slices %.4f (%.0f s)"
              % (", ".join("%s = %.4g" % kv for kv in sorted(means.items())), n_images, pooled, time.time() - t0))
        result["caffe_test"] = dict(means, pooled_dice=pooled, iterations=n_images)
    net = caffe_net.open_net(deploy_proto, snapshot, gpu)
    caffe_net.set_batch(net, batch)
    per, summary = validation.validate(net, patients, threshold=threshold)
    validation.add_ceilings(per, summary, patients, net_kw.get("crop_mode", paper.DEFAULT_CROP_MODE))
    summary.update(decision=decision, tumor_threshold=threshold)
    result.update(summary)
    result["per_patient"] = {pid: {k: v for k, v in s.items() if k != "dice_2d"} for pid, s in per.items()}
    result["dice_2d"] = {pid: s["dice_2d"] for pid, s in per.items()}
    metrics = caffe_net.merge_json(os.path.join(run, "metrics.json"), result)
    per_patient_csv(os.path.join(run, "per_patient.csv"), per, profile)
    print(table(per, summary))
    if figures:
        for path in make_figures(run, net, patients, per, profile, threshold, summary["ceiling_dice_3d"]):
            print("figure: %s" % path)
    return metrics


def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate a trained fold: `caffe test` on the val net (pooled "
                                 "Dice from the DiceCounts layer), then per-patient 3D Dice, 2D Dice, pixel "
                                 "accuracy -> RUN/metrics.json, RUN/per_patient.csv, RUN/figures/.")
    ap.add_argument("--fold", type=int, required=True, help="validation fold k")
    ap.add_argument("--data", required=True, help="DATA folder (make data)")
    ap.add_argument("--run", required=True, help="run folder of tools/train.py")
    ap.add_argument("--snapshot", help="caffemodel (default RUN/final.caffemodel)")
    ap.add_argument("--gpu", type=int, help="GPU id (CUDA build of Caffe only)")
    ap.add_argument("--batch", type=int, default=8, help="images per forward (default 8)")
    ap.add_argument("--no-figures", action="store_true", help="skip the figures")
    ap.add_argument("--no-caffe-test", action="store_true", help="skip the `caffe test` step")
    ap.add_argument("--decision", choices=score.DECISIONS, help="how a pixel is called tumor (default the run's; "
                    "argmax is the report's)")
    a = ap.parse_args(argv)
    evaluate(a.data, a.fold, a.run, a.snapshot, a.gpu, a.batch, not a.no_figures, not a.no_caffe_test, a.decision)


if __name__ == "__main__":
    main()
