"""RUN/train_log.csv: one row per validation point of a training run (tools/train.py writes it, Fig. 5 and
the recipe study read it).

Columns: FIXED_COLUMNS, then one column per validation patient (pseudonym: its 3D Dice).
  iteration, lr             the solver's iteration and the lr Caffe used there
  train_loss                mean training loss since the previous row
  val_mean_dice_3d          mean validation 3D Dice under the run's decision rule (tools/score.py)
  val_loss                  the training objective on the validation slices
  val_precision, val_recall, val_pred_ratio   calibration: means over patients (pred_ratio = predicted/true)
  val_mean_dice_3d_argmax, val_mean_dice_3d_prior   the mean 3D Dice under the other decision rule (one of
                            the two is filled: the rule the run does not use)
  elapsed                   wall seconds since this invocation of train.py started
"""
import csv
import io
import math
import os

import atomic

FIXED_COLUMNS = ("iteration", "lr", "train_loss", "val_mean_dice_3d", "val_loss", "val_precision", "val_recall",
                 "val_pred_ratio", "val_mean_dice_3d_argmax", "val_mean_dice_3d_prior", "elapsed")


class TrainLog:
    """RUN/train_log.csv, rewritten atomically after each row; on resume rows past the restored
    iteration are dropped (they belong to the lost part of the run)."""

    def __init__(self, path, patients, resume_iter=None):
        self.path = path
        self.columns = list(FIXED_COLUMNS) + list(patients)
        self.rows = []
        if resume_iter is not None and os.path.exists(path):
            with open(path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r["iteration"])) <= resume_iter]

    def add(self, **row):
        self.rows.append({k: ("" if row.get(k) is None else row[k]) for k in self.columns})
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(self.rows)
        atomic.write_text(self.path, buf.getvalue())


def read(csv_path):
    """Rows of a train_log.csv as dicts of floats (empty cells -> nan)."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    return [{k: (float(v) if v not in ("", None) else float("nan")) for k, v in r.items()} for r in rows]


def validated_rows(csv_path):
    """read()'s rows that hold a validation (a row without one: a stop between validations)."""
    return [r for r in read(csv_path) if not math.isnan(r.get("val_mean_dice_3d", float("nan")))]


def patient_columns(rows):
    """The per-patient columns of read()'s rows (every column that is not one of FIXED_COLUMNS)."""
    return [k for k in (rows[0] if rows else ()) if k not in FIXED_COLUMNS]
