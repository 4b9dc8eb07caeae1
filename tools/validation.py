"""The validation fold and how a net scores on it (shared by tools/train.py and tools/evaluate.py).

This module owns:
  * `load_patients`: the un-augmented validation slices of fold k, per patient (pseudonym), from the
    HDF5 files the DATA manifest lists;
  * `validate`: a net's predictions on them (tools/caffe_net.forward, tools/score.py's decision rule)
    scored per patient (3D Dice, 2D Dice, precision, recall, ...) and over the cohort, with the
    training objective (layers/weighted_loss.py) when asked;
  * `add_ceilings`: each patient's resolution ceiling (tools/ceiling.py) beside those scores.
"""
import os

import h5py
import numpy as np

import paper
from tools import caffe_net, score


def load_patients(data_dir, fold):
    """[(pseudonym, data N x 3 x H x W float32, label N x H x W uint8, slice N)] of fold k, in order."""
    manifest = caffe_net.read_manifest(data_dir)
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
        out = caffe_net.forward(net, data, blobs)
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


def add_ceilings(per, summary, patients, crop_mode):
    """Each patient's resolution ceiling (tools/ceiling.py) into per[pid]["ceiling_dice_3d"], their mean into
    summary["ceiling_dice_3d"]; returns that mean."""
    from prototxt import net as netdef
    from tools import ceiling
    ceilings = ceiling.fold_ceilings(patients, netdef.crop_offset(crop_mode))
    for pid, c in ceilings.items():
        per[pid]["ceiling_dice_3d"] = c
    summary["ceiling_dice_3d"] = score.mean_sd(ceilings.values())[0]
    return summary["ceiling_dice_3d"]
