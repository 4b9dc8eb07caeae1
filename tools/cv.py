"""`make cv`: k-fold cross-validation — train and evaluate every fold, then one table.

Each fold k runs `tools/train.py --fold k --run RUNS/fold<k>` and then `tools/evaluate.py` (the same
commands as `make train` / `make eval`), one after the other on the CPU, or in parallel one fold per
GPU with --gpus 0,1,... (a fold waits for a free GPU). A fold whose RUN already holds final.caffemodel
and metrics.json is not retrained (rerun with --force), and an interrupted fold resumes from its
snapshots. Logs go to RUNS/fold<k>/cv.log.

Output: RUNS/cv.json and RUNS/cv.md: 3D Dice (mean ± sd over the fold's patients) per fold, and
mean ± sd over folds and over all patients; the profile is written into both. RUNS/cv_dice.png: each
fold's per-patient 3D Dice side by side; RUNS/cv_dice_vs_volume.png: 3D Dice against tumor volume.

Seeds (--seeds 0,1,2): each seed a full cross-validation (train.py --seed s) in RUNS/seed<s>/, with its own
tables and figures as above, then RUNS/cv_seeds.json, RUNS/cv_seeds.md (3D Dice per fold and seed, mean ± sd
over seeds and over folds) and RUNS/cv_seeds_dice.png.

On a Slurm cluster (make cv SCHEDULER=slurm, tools/slurm.py) every fold x seed is one array task: --plan lists
the tasks, --task I runs one exactly as above, --summary-only writes the tables and figures.

CLI: python3 -m tools.cv --data DATA [--folds 5] [--profile P] [--gpus 0,1] [--weights W] [--runs runs/cv]
     [--seeds 0,1,2] [--train-args "--crop aligned ..."] [--plan | --task I | --summary-only]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import atomic
import paper
from tools import caffe_net, score
from solver import profiles
from tools import train as train_tool


def fold_commands(k, data, run, profile, weights=None, gpu=None, extra=()):
    """The train and evaluate command lines of fold k."""
    train = train_tool.command(k, data, run, profile, weights=weights, gpu=gpu, extra=extra)
    evaluate = [sys.executable, "-m", "tools.evaluate", "--fold", str(k), "--data", data, "--run", run]
    return train, evaluate + (["--gpu", str(gpu)] if gpu is not None else [])


def fold_done(run):
    return os.path.exists(os.path.join(run, "final.caffemodel")) and os.path.exists(os.path.join(run, "metrics.json"))


def run_folds(folds, data, runs, profile, weights=None, gpus=None, force=False, extra=()):
    """Train + evaluate each fold (parallel over gpus when given); {k: return code}."""
    slots = list(gpus) if gpus else [None]
    todo = [k for k in folds if force or not fold_done(os.path.join(runs, "fold%d" % k))]
    for k in folds:
        if k not in todo:
            print("fold %d: done already (%s)" % (k, os.path.join(runs, "fold%d" % k)))
    running = {}   # slot -> (k, proc, stage, log file)
    codes = {}

    def start(slot, k, stage):
        run = os.path.join(runs, "fold%d" % k)
        os.makedirs(run, exist_ok=True)
        train, ev = fold_commands(k, data, run, profile, weights, slot, extra)
        cmd = train if stage == "train" else ev
        logf = open(os.path.join(run, "cv.log"), "a")
        logf.write("$ %s\n" % " ".join(cmd))
        logf.flush()
        print("fold %d: %s%s" % (k, stage, "" if slot is None else " on GPU %s" % slot), flush=True)
        running[slot] = (k, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), stage, logf)

    queue = list(todo)
    try:
        while queue or running:
            for slot in slots:
                if slot not in running and queue:
                    start(slot, queue.pop(0), "train")
            time.sleep(1)
            for slot, (k, proc, stage, logf) in list(running.items()):
                if proc.poll() is None:
                    continue
                logf.close()
                del running[slot]
                if proc.returncode != 0:
                    codes[k] = proc.returncode
                    print("fold %d: %s failed (exit %d); see %s" % (k, stage, proc.returncode,
                          os.path.join(runs, "fold%d" % k, "cv.log")), flush=True)
                elif stage == "train":
                    start(slot, k, "evaluate")
                else:
                    codes[k] = 0
                    print("fold %d: done" % k, flush=True)
    except KeyboardInterrupt:
        for k, proc, stage, logf in running.values():
            proc.send_signal(2)       # train.py snapshots on SIGINT
        for k, proc, stage, logf in running.values():
            proc.wait()
        raise
    return codes


def summarize(folds, runs):
    """The cross-validation table (dict) from each RUNS/fold<k>/metrics.json."""
    rows, all_patients, profiles = [], {}, set()
    for k in folds:
        path = os.path.join(runs, "fold%d" % k, "metrics.json")
        if not os.path.exists(path):
            rows.append({"fold": k, "missing": True})
            continue
        with open(path) as f:
            m = json.load(f)
        profiles.add(m.get("profile"))
        pp = m.get("per_patient", {})
        per = {pid: s["dice_3d"] for pid, s in pp.items()}
        all_patients.update(per)
        rows.append({"fold": k, "patients": len(per), "mean_dice_3d": m["mean_dice_3d"],
                     "sd_dice_3d": m["sd_dice_3d"], "iterations": m.get("iterations"),
                     "profile": m.get("profile"), "per_patient": per,
                     "ceiling_dice_3d": m.get("ceiling_dice_3d", float("nan")),
                     "ceiling_per_patient": {pid: s["ceiling_dice_3d"] for pid, s in pp.items()
                                             if "ceiling_dice_3d" in s},
                     "mean_pred_ratio": m.get("mean_pred_ratio", float("nan")),
                     "min_dice_3d": min(per.values()) if per else float("nan"),
                     "truth_pixels": {pid: s["truth"] for pid, s in pp.items() if "truth" in s}})
    done = [r for r in rows if not r.get("missing")]
    fm, fs = score.mean_sd(r["mean_dice_3d"] for r in done)
    pm, ps = score.mean_sd(all_patients.values())
    ceilings = [c for r in done for c in r["ceiling_per_patient"].values()]
    return {"profile": ",".join(sorted(p for p in profiles if p)), "folds": rows,
            "mean_over_folds": fm, "sd_over_folds": fs, "mean_over_patients": pm, "sd_over_patients": ps,
            "ceiling_over_patients": score.mean_sd(ceilings)[0],
            "min_over_patients": min(all_patients.values()) if all_patients else float("nan"),
            "patients": len(all_patients), "report_val_dice_3d": paper.REPORT_VAL_DICE_3D}


def figure(table, png):
    """Per-patient 3D Dice of each fold, side by side (tools/figures.dice_groups)."""
    from tools import figures
    groups = [("fold %d" % r["fold"], r["per_patient"]) for r in table["folds"] if not r.get("missing")]
    return figures.dice_groups(png, groups, "Cross-validation: 3D Dice %.3f ± %.3f over folds [%s]"
                               % (table["mean_over_folds"], table["sd_over_folds"], table["profile"]))


def tumor_volumes_ml(table, data_dir):
    """{patient: tumor volume in ml} from the table's truth pixels (in the 100x100 crops) and the manifest's
    geometry (a crop pixel is box_side / 100 source pixels on a side; slice spacing dz)."""
    geometry = {p["id"]: p for p in caffe_net.read_manifest(data_dir)["patients"]}
    volumes = {}
    for r in table["folds"]:
        for pid, truth in r.get("truth_pixels", {}).items():
            g = geometry.get(pid)
            if g is None:
                continue
            dz, dy, dx = g["spacing"]
            scale = g["box_side"] / float(paper.INPUT_SIZE)
            volumes[pid] = truth * (scale * dy) * (scale * dx) * dz / 1000.0
    return volumes


def size_figure(table, volumes, png):
    """3D Dice against tumor volume, one colour per fold (tools/figures.dice_vs_size)."""
    from tools import figures
    done = [r for r in table["folds"] if not r.get("missing")]
    points = [(volumes[pid], d, "fold %d" % r["fold"]) for r in done
              for pid, d in r["per_patient"].items() if pid in volumes]
    ceilings = [(volumes[pid], c) for r in done for pid, c in r["ceiling_per_patient"].items() if pid in volumes]
    return figures.dice_vs_size(png, points, "Cross-validation: 3D Dice against tumor volume [%s]"
                                % table["profile"], ceilings)


def markdown(table):
    lines = ["# Cross-validation: 3D Dice per fold (profile %s)" % table["profile"], "",
             "The ceiling is the mean of the fold's per-patient resolution ceilings (tools/ceiling.py): what the "
             "net's 15x15 output could reach. pred/true: predicted over true tumor pixels (mean over patients).", "",
             "| fold | patients | 3D Dice mean ± sd | lowest patient | ceiling | % of ceiling | pred/true | iterations |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table["folds"]:
        if r.get("missing"):
            lines.append("| %d | – | missing | – | – | – | – | – |" % r["fold"])
        else:
            lines.append("| %d | %d | %.3f ± %.3f | %.3f | %.3f | %.0f %% | %.2f | %s |" % (
                r["fold"], r["patients"], r["mean_dice_3d"], r["sd_dice_3d"], r["min_dice_3d"],
                r["ceiling_dice_3d"], 100 * r["mean_dice_3d"] / r["ceiling_dice_3d"], r["mean_pred_ratio"],
                r["iterations"]))
    lines += ["", "Over folds: **%.3f ± %.3f**; over all %d patients: %.3f ± %.3f, lowest %.3f; their mean ceiling "
              "%.3f (report, one fold: %.2f)."
              % (table["mean_over_folds"], table["sd_over_folds"], table["patients"],
                 table["mean_over_patients"], table["sd_over_patients"], table["min_over_patients"],
                 table["ceiling_over_patients"], table["report_val_dice_3d"]), ""]
    return "\n".join(lines)


def write_summary(folds, runs, data):
    """RUNS/cv.json, cv.md and the two figures from the fold runs; the markdown table."""
    table = summarize(folds, runs)
    atomic.write_json(os.path.join(runs, "cv.json"), table)
    text = markdown(table)
    atomic.write_text(os.path.join(runs, "cv.md"), text)
    figure(table, os.path.join(runs, "cv_dice.png"))
    size_figure(table, tumor_volumes_ml(table, data), os.path.join(runs, "cv_dice_vs_volume.png"))
    print(text)
    print("table: %s; figures: %s, %s" % (os.path.join(runs, "cv.md"), os.path.join(runs, "cv_dice.png"),
                                          os.path.join(runs, "cv_dice_vs_volume.png")))
    return table


# --- seeds ---------------------------------------------------------------------------------------------
def seed_runs(runs, seed):
    """The runs folder of one seed (RUNS itself without --seeds)."""
    return runs if seed is None else os.path.join(runs, "seed%d" % seed)


def summarize_seeds(seed_tables):
    """Over seeds: {seed: cv table} -> each seed's mean over folds, mean ± sd over seeds (of those means), per
    fold mean ± sd over seeds, and mean ± sd over every fold x seed run."""
    seeds = sorted(seed_tables)
    per_fold = {}
    for s in seeds:
        for r in seed_tables[s]["folds"]:
            per_fold.setdefault(r["fold"], {})[s] = None if r.get("missing") else r["mean_dice_3d"]
    done = {s: [r["mean_dice_3d"] for r in seed_tables[s]["folds"] if not r.get("missing")] for s in seeds}
    seed_means = {s: seed_tables[s]["mean_over_folds"] for s in seeds if done[s]}
    m, sd = score.mean_sd(seed_means.values())
    am, asd = score.mean_sd(d for s in seeds for d in done[s])
    folds = []
    for k in sorted(per_fold):
        fm, fsd = score.mean_sd(d for d in per_fold[k].values() if d is not None)
        folds.append({"fold": k, "per_seed": {str(s): d for s, d in per_fold[k].items()}, "mean_over_seeds": fm,
                      "sd_over_seeds": fsd})
    return {"profile": ",".join(sorted({t["profile"] for t in seed_tables.values() if t["profile"]})),
            "seeds": seeds, "folds": folds,
            "per_seed": {str(s): {"mean_over_folds": seed_tables[s]["mean_over_folds"],
                                  "sd_over_folds": seed_tables[s]["sd_over_folds"],
                                  "folds_done": len(done[s])} for s in seeds},
            "mean_over_seeds": m, "sd_over_seeds": sd, "mean_over_runs": am, "sd_over_runs": asd,
            "runs": sum(len(v) for v in done.values()), "report_val_dice_3d": paper.REPORT_VAL_DICE_3D}


def markdown_seeds(t):
    seeds = t["seeds"]
    lines = ["# Cross-validation over %d seeds: 3D Dice per fold and seed (profile %s)" % (len(seeds), t["profile"]),
             "", "| fold | " + " | ".join("seed %d" % s for s in seeds) + " | over seeds |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for r in t["folds"]:
        cells = ["missing" if r["per_seed"][str(s)] is None else "%.3f" % r["per_seed"][str(s)] for s in seeds]
        lines.append("| %d | %s | %.3f ± %.3f |" % (r["fold"], " | ".join(cells), r["mean_over_seeds"],
                                                    r["sd_over_seeds"]))
    cells = ["%.3f ± %.3f" % (t["per_seed"][str(s)]["mean_over_folds"], t["per_seed"][str(s)]["sd_over_folds"])
             for s in seeds]
    lines.append("| over folds | %s | |" % " | ".join(cells))
    lines += ["", "Over seeds (each seed's mean over folds): **%.3f ± %.3f**; over all %d fold runs: %.3f ± %.3f "
              "(report, one fold: %.2f)." % (t["mean_over_seeds"], t["sd_over_seeds"], t["runs"], t["mean_over_runs"],
                                              t["sd_over_runs"], t["report_val_dice_3d"]), ""]
    return "\n".join(lines)


def write_seeds_summary(seed_tables, runs):
    """RUNS/cv_seeds.json, cv_seeds.md and cv_seeds_dice.png (each seed's per-patient 3D Dice over its folds)."""
    from tools import figures
    t = summarize_seeds(seed_tables)
    atomic.write_json(os.path.join(runs, "cv_seeds.json"), t)
    text = markdown_seeds(t)
    atomic.write_text(os.path.join(runs, "cv_seeds.md"), text)
    groups = [("seed %d" % s, {"%s/%d" % (pid, r["fold"]): d for r in seed_tables[s]["folds"] if not r.get("missing")
                               for pid, d in r["per_patient"].items()}) for s in t["seeds"]]
    figures.dice_groups(os.path.join(runs, "cv_seeds_dice.png"), groups, "Cross-validation over seeds: 3D Dice "
                        "%.3f ± %.3f over seeds [%s]" % (t["mean_over_seeds"], t["sd_over_seeds"], t["profile"]))
    print(text)
    print("table over seeds: %s; figure: %s" % (os.path.join(runs, "cv_seeds.md"),
                                               os.path.join(runs, "cv_seeds_dice.png")))
    return t


def tasks(folds, seeds, runs):
    """Every (seed, fold, run folder) in a fixed order: the tasks of a Slurm array (index = position)."""
    return [(s, k, os.path.join(seed_runs(runs, s), "fold%d" % k)) for s in seeds for k in folds]


def plan(a, folds, seeds, runs):
    """--plan: what tools/slurm.py needs to submit this cross-validation as a job array."""
    return {"tool": "cv", "out": runs, "prepare": False, "gpu_args": ["--gpus", "0"],
            "bind": [os.path.abspath(p) for p in (a.data, runs, a.weights) if p],
            "tables": [os.path.join(runs, "cv_seeds.md" if seeds != [None] else "cv.md")],
            "tasks": [{"name": "fold %d" % k if s is None else "seed %d fold %d" % (s, k), "run": run,
                       "done": fold_done(run)} for s, k, run in tasks(folds, seeds, runs)]}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Cross-validation: train and evaluate every fold (sequentially, "
                                 "or one per GPU with --gpus), then the table of 3D Dice per fold.")
    ap.add_argument("--data", required=True, help="DATA folder (make data)")
    ap.add_argument("--folds", type=int, default=paper.N_FOLDS, help="number of folds (default 5)")
    ap.add_argument("--profile", default=profiles.DEFAULT_PROFILE, choices=sorted(profiles.PROFILES))
    ap.add_argument("--gpus", help="comma-separated GPU ids: one fold per GPU at a time")
    ap.add_argument("--weights", help="pretrained caffemodel for tools/train.py --weights")
    ap.add_argument("--runs", default="runs/cv", help="folder of the fold runs (default runs/cv)")
    ap.add_argument("--force", action="store_true", help="retrain folds that are done")
    ap.add_argument("--seeds", help="comma-separated Caffe seeds: one full cross-validation per seed in "
                    "RUNS/seed<s>/, summarised over seeds and folds")
    train_tool.add_passthrough_args(ap, "fold", "--crop aligned --loss-sum")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the tasks (fold x seed) as JSON (tools/slurm.py)")
    mode.add_argument("--task", type=int, metavar="I", help="run only task I of --plan (one Slurm array task)")
    mode.add_argument("--summary-only", action="store_true", help="only the tables and figures, from the runs")
    a = ap.parse_args(argv)
    n = len(caffe_net.read_manifest(a.data)["folds"])
    if n != a.folds:
        raise SystemExit("error: %s has %d folds, not %d; remake the data with --folds %d"
                         % (a.data, n, a.folds, a.folds))
    gpus = [g.strip() for g in a.gpus.split(",") if g.strip()] if a.gpus else None
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()] if a.seeds else [None]
    except ValueError:
        raise SystemExit("error: --seeds %r: give integers separated by commas, e.g. 0,1,2" % a.seeds)
    folds = list(range(a.folds))
    runs = os.path.abspath(a.runs)
    if a.plan:
        print(json.dumps(plan(a, folds, seeds, runs)))
        return 0
    todo = tasks(folds, seeds, runs)
    if a.task is not None:
        if not 0 <= a.task < len(todo):
            raise SystemExit("error: --task %d: there are %d tasks (0..%d)" % (a.task, len(todo), len(todo) - 1))
        todo = [todo[a.task]]
    codes = {}
    for s in seeds:
        mine = [k for s2, k, _ in todo if s2 == s]
        if mine and not a.summary_only:
            extra = train_tool.passthrough(a) + ([] if s is None else ["--seed", str(s)])
            codes.update({(s, k): c for k, c in run_folds(mine, os.path.abspath(a.data), seed_runs(runs, s),
                                                           a.profile, a.weights, gpus, a.force, extra=extra).items()})
    if a.task is not None:
        return 1 if any(codes.values()) else 0
    tables = {s: write_summary(folds, seed_runs(a.runs, s), a.data) for s in seeds}
    if seeds != [None]:
        write_seeds_summary(tables, a.runs)
    return 1 if any(codes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
