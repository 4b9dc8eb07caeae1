"""`make ablation`: SPEC §7's open choices, each changed alone, under one profile and seed, as one table.

Variants (fold --fold of the same cohort, same profile, same Caffe seed):
  baseline    crop center (offset 14), one box per patient, loss divided by the pixel count
  crop        crop aligned (offset 11, caffe.coord_map)
  box         one box per slice (its own `make data --box slice` run: OUT/data_box-slice)
  resize      anti-aliased box -> 100x100 resize (its own `make data --resize antialias` run)
  loss        plain weighted sum (Fig. 2 as printed)
  weights     class weights 0.5/0.5 instead of the report's 0.04/0.96 (not a SPEC §7 choice: it measures
              what the report's weighting costs or gains under the same profile)
Each variant is a tools/train.py run in OUT/<variant>/ (resumable; a finished run is reused); its
final validation scores (metrics.json) fill the table. Output: OUT/ablation.json, OUT/ablation.md and
OUT/ablation_dice.png (each variant's per-patient 3D Dice side by side); a variant without results is
named "missing" in the table.

On a Slurm cluster (make ablation SCHEDULER=slurm, tools/slurm.py) each variant is one array task: --plan
lists them, --prepare-only makes the data (one job before the array), --task I trains variant I exactly as
above, --summary-only writes the table and figure.

CLI: python3 -m tools.ablation --raw RAW --out OUT [--profile fast] [--fold 0] [--seed 0] [--gpu ID]
     [--only VARIANT ...] [--train-args "..."] [--plan | --prepare-only | --task I | --summary-only]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import atomic
import paper
from solver import profiles
from tools import train as train_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (what changes, make_data.py options, train.py options)
VARIANTS = (
    ("baseline", "defaults: crop center 14, box per patient, loss mean, bilinear resize", (), []),
    ("crop", "crop aligned (offset 11)", (), ["--crop", "aligned"]),
    ("box", "box per slice", ("--box", "slice"), []),
    ("loss", "loss plain sum", (), ["--loss-sum"]),
    ("resize", "anti-aliased resize", ("--resize", "antialias"), []),
    ("weights", "class weights 0.5/0.5", (), ["--class-weights", "0.5", "0.5"]),
)


def data_folder(out, data_args):
    """OUT/data_default, or OUT/data_box-slice etc. for a variant with its own make_data options."""
    name = "-".join(a.lstrip("-") for a in data_args) or "default"
    return os.path.join(out, "data_" + name)


def make_data(raw, data, data_args, folds, seed, jobs):
    cmd = [sys.executable, "-m", "data_prep.make_data", "--raw", raw, "--data", data, "--folds", str(folds),
           "--seed", str(seed), "--jobs", str(jobs), "--no-progress"] + list(data_args)
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def train(data, run, fold, profile, seed, extra, gpu=None):
    """One tools/train.py run; its seconds. A run that stops (an interruption: exit 130; an error) ends this
    tool with one line and train.py's exit status: the same command resumes it from its snapshot."""
    cmd = train_tool.command(fold, data, run, profile, seed=seed, gpu=gpu, extra=extra)
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        print("error: the training run %s stopped (exit status %d); the same command resumes it" % (run, rc),
              file=sys.stderr)
        raise SystemExit(rc)
    return time.time() - t0


def markdown(result):
    lines = ["# Ablation of SPEC §7's choices (profile %s, fold %d, seed %d)" % (result["profile"], result["fold"],
                                                                            result["seed"]), "",
             "| variant | change | 3D Dice mean ± sd | 2D Dice mean | pixel acc. | iterations |",
             "|---|---|---|---|---|---|"]
    for r in result["variants"]:
        if r.get("missing"):
            lines.append("| %s | %s | missing | – | – | – |" % (r["variant"], r["change"]))
            continue
        lines.append("| %s | %s | %.3f ± %.3f | %.3f | %.4f | %d |" % (
            r["variant"], r["change"], r["mean_dice_3d"], r["sd_dice_3d"], r["mean_dice_2d"],
            r["mean_pixel_accuracy"], r["iterations"]))
    lines.append("")
    return "\n".join(lines)


def variant_done(run):
    return all(os.path.exists(os.path.join(run, f)) for f in ("final.caffemodel", "metrics.json"))


def row(name, change, data_args, extra, run, seconds=None):
    """A table row from RUN/metrics.json ({"missing": True} when the variant has no results)."""
    path = os.path.join(run, "metrics.json")
    if not os.path.exists(path):
        return {"variant": name, "change": change, "data_options": list(data_args), "options": extra, "missing": True}
    with open(path) as f:
        m = json.load(f)
    return {"variant": name, "change": change, "data_options": list(data_args), "options": extra,
            "mean_dice_3d": m["mean_dice_3d"], "sd_dice_3d": m["sd_dice_3d"],
            "mean_dice_2d": m["mean_dice_2d"], "mean_pixel_accuracy": m["mean_pixel_accuracy"],
            "iterations": m["iterations"], "profile": m["profile"],
            "seconds": round(seconds if seconds is not None else m.get("train_seconds", 0.0), 1),
            "per_patient": {p: s["dice_3d"] for p, s in m["per_patient"].items()}}


def write_result(a, out, rows):
    result = {"profile": a.profile, "fold": a.fold, "seed": a.seed, "variants": rows}
    atomic.write_json(os.path.join(out, "ablation.json"), result)
    atomic.write_text(os.path.join(out, "ablation.md"), markdown(result))
    return result


def write_figure(a, out, rows):
    from tools import figures
    figures.dice_groups(os.path.join(out, "ablation_dice.png"),
                        [(r["variant"], r["per_patient"]) for r in rows if not r.get("missing")],
                        "Ablation, fold %d: 3D Dice per variant [%s]" % (a.fold, a.profile))


def plan(a, out, raw, chosen):
    """--plan: what tools/slurm.py needs to submit the variants as a job array (after a data job)."""
    return {"tool": "ablation", "out": out, "prepare": True, "gpu_args": ["--gpu", "0"], "bind": [raw, out],
            "tables": [os.path.join(out, "ablation.md")],
            "tasks": [{"name": "variant %s" % v[0], "run": os.path.join(out, v[0]),
                       "done": variant_done(os.path.join(out, v[0]))} for v in chosen]}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Ablation of SPEC §7: crop 14 vs 11, box per patient vs per slice, "
                                 "loss mean vs sum; same profile and seed; one table.")
    ap.add_argument("--raw", required=True, help="cohort folder (e.g. the demo's phantoms, runs/demo/raw)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--profile", default="fast", choices=sorted(profiles.PROFILES))
    ap.add_argument("--fold", type=int, default=0, help="validation fold (default 0)")
    ap.add_argument("--folds", type=int, default=paper.N_FOLDS)
    ap.add_argument("--seed", type=int, default=paper.SEED, help="fold and Caffe seed (default 0)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--gpu", type=int, help="GPU id (CUDA build of Caffe)")
    ap.add_argument("--only", nargs="*", choices=[v[0] for v in VARIANTS], help="run only these variants")
    train_tool.add_passthrough_args(ap, "variant", "--weights weights/ts-fcn-init-fcn32s.caffemodel")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the variants as JSON tasks (tools/slurm.py)")
    mode.add_argument("--prepare-only", action="store_true", help="only make the variants' data")
    mode.add_argument("--task", type=int, metavar="I", help="train only variant I of --plan (one Slurm array task; "
                      "the data must exist: --prepare-only)")
    mode.add_argument("--summary-only", action="store_true", help="only the table and figure, from the runs")
    a = ap.parse_args(argv)
    out = os.path.abspath(a.out)
    raw = os.path.abspath(a.raw)
    if not os.path.isdir(raw):
        raise SystemExit("error: cohort %s not found (make phantoms OUT=%s, or make demo)" % (a.raw, a.raw))
    chosen = [v for v in VARIANTS if not a.only or v[0] in a.only]
    if a.plan:
        print(json.dumps(plan(a, out, raw, chosen)))
        return 0
    datas = {data_args: data_folder(out, data_args) for data_args in sorted({v[2] for v in chosen})}
    if a.task is not None:
        if not 0 <= a.task < len(chosen):
            raise SystemExit("error: --task %d: there are %d variants (0..%d)" % (a.task, len(chosen), len(chosen) - 1))
        name, change, data_args, extra = chosen[a.task]
        if not os.path.exists(os.path.join(datas[data_args], "manifest.json")):
            raise SystemExit("error: %s not made yet (tools/ablation.py --prepare-only)" % datas[data_args])
        train(datas[data_args], os.path.join(out, name), a.fold, a.profile, a.seed, extra + train_tool.passthrough(a),
              a.gpu)
        return 0
    if not a.summary_only:
        for data_args in datas:
            make_data(raw, datas[data_args], data_args, a.folds, a.seed, a.jobs)
        if a.prepare_only:
            return 0
    rows = []
    for name, change, data_args, extra in chosen:
        run = os.path.join(out, name)
        seconds = None if a.summary_only else train(datas[data_args], run, a.fold, a.profile, a.seed,
                                                    extra + train_tool.passthrough(a), a.gpu)
        rows.append(row(name, change, data_args, extra, run, seconds))
        result = write_result(a, out, rows)
    write_figure(a, out, rows)
    print(markdown(result))
    print("table: %s; figure: %s" % (os.path.join(out, "ablation.md"), os.path.join(out, "ablation_dice.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
