"""`make eval`: score a trained fold — `caffe test` on the val net, then the per-patient evaluator.

This module owns inference on the validation fold (tools/train.py reuses it for its periodic
validation):
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

CLI: python3 tools/evaluate.py --fold K --data DATA --run RUN [--snapshot S] [--gpu ID]
SNAPSHOT defaults to RUN/final.caffemodel. Outputs carry the run's profile and only pseudonyms.
"""
import argparse
import csv
import io
import json
import os
import re
import shlex
import subprocess
import time

os.environ.setdefault("GLOG_minloglevel", "2")   # keep Caffe's per-layer log off the console

import h5py  # noqa: E402
import numpy as np  # noqa: E402

import atomic  # noqa: E402
import paper  # noqa: E402
from prototxt.net import DICE_TOPS  # noqa: E402
from tools import score  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- device ---------------------------------------------------------------------------------------
def cuda_build():
    """True when this pycaffe was built with CUDA (CPU-only builds abort on any GPU call)."""
    import caffe
    lib = caffe._caffe.__file__
    try:
        out = subprocess.run(["ldd", lib], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             universal_newlines=True).stdout
    except OSError:
        return False
    return "libcudart" in out


def set_mode(gpu=None):
    """caffe.set_mode_cpu(), or set_mode_gpu() + set_device(gpu); SystemExit with one line on a
    CPU-only Caffe."""
    import caffe
    if gpu is None:
        caffe.set_mode_cpu()
        return "CPU"
    if not cuda_build():
        raise SystemExit("error: --gpu %s asked for, but this Caffe (%s) is a CPU-only build; run without "
                         "--gpu, or build Caffe with CUDA (make caffe-cuda)" % (gpu, caffe._caffe.__file__))
    caffe.set_device(int(gpu))
    caffe.set_mode_gpu()
    return "GPU %s" % gpu


# --- run folder -----------------------------------------------------------------------------------
def run_info(run):
    """RUN/run.json written by tools/train.py (profile, crop mode, ...); {} when absent."""
    path = os.path.join(run, "run.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def merge_json(path, update):
    """Merge `update` into the JSON object at path (atomically)."""
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    old.update(update)
    atomic.write_json(path, old)
    return old


# --- validation data ------------------------------------------------------------------------------
def read_manifest(data_dir):
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(path):
        raise SystemExit("error: %s not found; make it with `make data`" % path)
    with open(path) as f:
        return json.load(f)


def load_patients(data_dir, fold):
    """[(pseudonym, data N x 3 x H x W float32, label N x H x W uint8, slice N)] of fold k, in order."""
    manifest = read_manifest(data_dir)
    by_id = {p["id"]: p for p in manifest["patients"]}
    out = []
    for pid in manifest["folds"][fold]:
        path = os.path.join(data_dir, by_id[pid]["h5"])
        try:
            with h5py.File(path, "r") as f:
                data = np.asarray(f["data"], dtype=np.float32)
                label = (np.asarray(f["label"])[:, 0] > 0.5).astype(np.uint8)
                slices = np.asarray(f["slice"]) if "slice" in f else np.arange(len(data))
        except (OSError, KeyError) as e:
            raise SystemExit("error: patient %s, file %s: %s" % (pid, by_id[pid]["h5"], e))
        out.append((pid, data, label, slices))
    return out


# --- forward --------------------------------------------------------------------------------------
def deploy_net(prototxt, weights=None, batch=8):
    """A TEST-phase net from a deploy prototxt, reshaped to `batch` inputs."""
    import caffe
    net = caffe.Net(prototxt, caffe.TEST) if weights is None else caffe.Net(prototxt, caffe.TEST, weights=weights)
    shape = list(net.blobs["data"].data.shape)
    shape[0] = batch
    net.blobs["data"].reshape(*shape)
    net.reshape()
    return net


def forward(net, data, blobs=("prob",)):
    """Forward N images in the net's batch size; {blob: N x ... array} (copies)."""
    b = net.blobs["data"].data.shape[0]
    out = {k: [] for k in blobs}
    for i in range(0, len(data), b):
        chunk = data[i:i + b]
        n = len(chunk)
        if net.blobs["data"].data.shape[0] != n:       # a short last batch: shrink, not pad
            net.blobs["data"].reshape(n, *chunk.shape[1:])
            net.reshape()
        net.blobs["data"].data[...] = chunk
        net.forward()
        for k in blobs:
            out[k].append(net.blobs[k].data.copy())
    if net.blobs["data"].data.shape[0] != b:
        net.blobs["data"].reshape(b, *net.blobs["data"].data.shape[1:])
        net.reshape()
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def validate(net, patients, loss=None, threshold=0.5, alt_threshold=None):
    """{pseudonym: tools.score.patient_scores} of the predictions (tumor probability > threshold,
    tools/score.py's rule), and the cohort summary. With `loss` = (class weights, normalize), the summary
    also has `val_loss`: the training objective (layers/weighted_loss.py) of the net's scores, averaged over
    the validation images. With `alt_threshold`, also `alt_mean_dice_3d`: the mean 3D Dice under that
    threshold (the other decision rule), from the same forward pass."""
    import weighted_loss
    per, alt, losses = {}, {}, []
    blobs = ("prob", "score_crop") if loss else ("prob",)
    for pid, data, label, _ in patients:
        out = forward(net, data, blobs)
        prob = out["prob"][:, paper.TUMOR]
        per[pid] = score.patient_scores(score.predict(prob, threshold), label)
        if alt_threshold is not None:
            alt[pid] = score.dice_3d(score.predict(prob, alt_threshold), label)
        if loss:
            losses += [weighted_loss.weighted_loss(s[None], y[None, None], *loss)[0]
                       for s, y in zip(out["score_crop"], label)]
    summary = score.cohort_summary(per)
    if loss:
        summary["val_loss"] = float(np.mean(losses))
    if alt:
        summary["alt_mean_dice_3d"] = score.mean_sd(alt.values())[0]
    return per, summary


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


# --- outputs --------------------------------------------------------------------------------------
def add_ceilings(per, summary, patients, crop_mode):
    """Each patient's resolution ceiling (tools/ceiling.py) into per[pid]["ceiling_dice_3d"], their mean into
    summary["ceiling_dice_3d"]."""
    from prototxt import net as netdef
    from tools import ceiling
    ceilings = ceiling.fold_ceilings(patients, netdef.crop_offset(crop_mode))
    for pid, c in ceilings.items():
        per[pid]["ceiling_dice_3d"] = c
    summary["ceiling_dice_3d"] = score.mean_sd(ceilings.values())[0]


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
        blobs = forward(net, data[i:i + 1], ("score", "score_crop", "prob"))
        prob = blobs["prob"][0, paper.TUMOR]
        pred = score.predict(prob, threshold)
        d2 = score.dice(pred, label[i])
        path = os.path.join(out, "fig_panels_%s.png" % role)
        figures.panels(path, data[i], prob, pred, label[i],
                       "%s patient %s, slice %d: 2D Dice %.3f (patient 3D Dice %.3f) [%s]"
                       % (role, pid, int(slices[i]), d2, per[pid]["dice_3d"], profile))
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
        figures.fig5(path, log, run_info(run).get("epoch"), profile, ceiling)
        written.append(path)
    return written


def evaluate(data_dir, fold, run, snapshot=None, gpu=None, batch=8, figures=True, run_caffe_test=True,
             decision=None):
    """The whole of `make eval`; returns the merged metrics dict. decision: the rule (tools/score.py),
    default the run's."""
    import caffe  # noqa: F401  (after GLOG_minloglevel is set)
    from prototxt import net as netdef
    run = os.path.abspath(run)
    data_dir = os.path.abspath(data_dir)
    info = run_info(run)
    profile = info.get("profile", "unknown")
    snapshot = os.path.abspath(snapshot or os.path.join(run, "final.caffemodel"))
    if not os.path.exists(snapshot):
        raise SystemExit("error: snapshot %s not found; train first (make train FOLD=%d)" % (snapshot, fold))
    mode = set_mode(gpu)
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
    patients = load_patients(data_dir, fold)
    n_images = sum(len(p[1]) for p in patients)
    result = {"profile": profile, "fold": fold, "snapshot": os.path.relpath(snapshot, run), "mode": mode}
    if run_caffe_test:
        t0 = time.time()
        means, pooled = caffe_test(val_proto, snapshot, n_images, fold_dir, gpu)
        print("caffe test: %s; pooled Dice over %d validation slices %.4f (%.0f s)"
              % (", ".join("%s = %.4g" % kv for kv in sorted(means.items())), n_images, pooled, time.time() - t0))
        result["caffe_test"] = dict(means, pooled_dice=pooled, iterations=n_images)
    net = deploy_net(deploy_proto, snapshot, batch)
    per, summary = validate(net, patients, threshold=threshold)
    add_ceilings(per, summary, patients, net_kw.get("crop_mode", paper.DEFAULT_CROP_MODE))
    summary.update(decision=decision, tumor_threshold=threshold)
    result.update(summary)
    result["per_patient"] = {pid: {k: v for k, v in s.items() if k != "dice_2d"} for pid, s in per.items()}
    result["dice_2d"] = {pid: s["dice_2d"] for pid, s in per.items()}
    metrics = merge_json(os.path.join(run, "metrics.json"), result)
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
