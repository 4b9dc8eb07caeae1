"""Scores of a segmentation against its truth: Dice (2D per slice, 3D per patient), pixel accuracy.

SPEC §6: Dice = 2|A∩B| / (|A|+|B|). The headline is the **3D Dice per patient**: sum the numerators
(2|A∩B|) and the denominators (|A|+|B|) over all of that patient's slices, then divide once. That is
not the mean of the patient's 2D Dice: a slice with a small tumor weighs little in 3D Dice but as much
as any other slice in the mean of 2D Dice.

Convention for empty masks: when prediction and truth are both empty (denominator 0) the two agree
perfectly, so Dice = 1.0 (`EMPTY_DICE`). A 3D Dice is only empty-vs-empty when every slice of the
patient is. Pixel accuracy is the fraction of pixels whose predicted class equals the truth.

Masks are anything numpy turns into arrays of the same shape; nonzero is tumor. Per-slice arrays
are (N, H, W) (or (H, W) for one slice).

The decision rule (how a pixel is called tumor) lives here too: `tumor_threshold` turns a rule into
the tumor probability above which a pixel is tumor, `predict` applies it. "argmax" is the report's
(paper.DECISION_RULE: probability > 0.5 for two classes); "prior" undoes the prior shift of class weights
(w_bg, w_tumor): a net trained with them estimates p' = w_t p / (w_t p + w_bg (1 - p)), so p > 0.5 is
p' > w_t / (w_t + w_bg) (0.96 for the report's weights).

Calibration per patient: precision |A∩B|/|A|, recall |A∩B|/|B|, and pred_ratio |A|/|B| (predicted over
true tumor pixels; above 1 over-segments).
"""
import numpy as np

import paper

EMPTY_DICE = 1.0   # both prediction and truth empty: perfect agreement
DECISIONS = ("argmax", "prior")
DEFAULT_DECISION = paper.DECISION_RULE


def tumor_threshold(decision=DEFAULT_DECISION, class_weights=paper.CLASS_WEIGHTS):
    """The tumor probability above which a pixel is tumor under `decision`."""
    if decision == "argmax":
        return 0.5
    if decision == "prior":
        w_bg, w_tumor = (float(w) for w in class_weights)
        return w_tumor / (w_tumor + w_bg)
    raise ValueError("decision %r not in %s" % (decision, DECISIONS))


def predict(prob_tumor, threshold=0.5):
    """The tumor mask of tumor probabilities: prob > threshold (at 0.5 this is argmax of two classes)."""
    return np.asarray(prob_tumor) > threshold


def counts(pred, truth):
    """(|A∩B|, |A|, |B|) of two masks of the same shape, as Python ints."""
    pred = np.asarray(pred) != 0
    truth = np.asarray(truth) != 0
    if pred.shape != truth.shape:
        raise ValueError("prediction %s and truth %s differ in shape" % (pred.shape, truth.shape))
    return int(np.count_nonzero(pred & truth)), int(np.count_nonzero(pred)), int(np.count_nonzero(truth))


def dice_from_counts(intersection, predicted, truth):
    """2 I / (P + T); EMPTY_DICE when P + T == 0."""
    denom = float(predicted) + float(truth)
    if denom == 0:
        return EMPTY_DICE
    return 2.0 * float(intersection) / denom


def dice(pred, truth):
    """Dice of two masks of any (same) shape: all their pixels pooled."""
    return dice_from_counts(*counts(pred, truth))


def dice_2d(pred, truth):
    """Per-slice Dice of (N, H, W) masks -> float array (N,)."""
    pred = np.asarray(pred) != 0
    truth = np.asarray(truth) != 0
    if pred.shape != truth.shape:
        raise ValueError("prediction %s and truth %s differ in shape" % (pred.shape, truth.shape))
    if pred.ndim == 2:
        pred, truth = pred[None], truth[None]
    axes = tuple(range(1, pred.ndim))
    inter = (pred & truth).sum(axis=axes).astype(np.float64)
    denom = pred.sum(axis=axes).astype(np.float64) + truth.sum(axis=axes)
    out = np.full(len(pred), EMPTY_DICE)
    nz = denom > 0
    out[nz] = 2.0 * inter[nz] / denom[nz]
    return out


def dice_3d(pred, truth):
    """3D Dice of one patient's (N, H, W) slices: numerators and denominators summed, then divided."""
    return dice(pred, truth)


def pixel_accuracy(pred, truth):
    """Fraction of pixels where the predicted class equals the truth."""
    pred = np.asarray(pred) != 0
    truth = np.asarray(truth) != 0
    if pred.shape != truth.shape:
        raise ValueError("prediction %s and truth %s differ in shape" % (pred.shape, truth.shape))
    return float(np.mean(pred == truth)) if pred.size else float("nan")


def mean_sd(values):
    """(mean, sd) over patients (or folds); sd is the sample sd (ddof 1), 0.0 for a single value."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return float(v.mean()), sd


def ratio(num, den):
    """num / den as a float, nan when den is 0."""
    return float(num) / den if den else float("nan")


def patient_scores(pred, truth):
    """Every score of one patient's (N, H, W) masks, as a JSON-ready dict."""
    inter, p, t = counts(pred, truth)
    d2 = dice_2d(pred, truth)
    return {
        "precision": ratio(inter, p), "recall": ratio(inter, t), "pred_ratio": ratio(p, t),
        "dice_3d": dice_from_counts(inter, p, t),
        "dice_2d_mean": float(d2.mean()) if d2.size else float("nan"),
        "dice_2d": [float(x) for x in d2],
        "pixel_accuracy": pixel_accuracy(pred, truth),
        "slices": int(len(d2)),
        "intersection": inter, "predicted": p, "truth": t,
    }


def nanmean(values):
    """Mean of the values that are not nan; nan when none is."""
    v = np.asarray(list(values), dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def cohort_summary(per_patient):
    """Mean and sd over patients of a {patient: patient_scores(...)} dict, plus the pooled Dice."""
    ids = sorted(per_patient)
    d3 = [per_patient[i]["dice_3d"] for i in ids]
    mean3, sd3 = mean_sd(d3)
    all2d = [x for i in ids for x in per_patient[i]["dice_2d"]]
    mean2, sd2 = mean_sd(all2d)
    acc_mean, acc_sd = mean_sd(per_patient[i]["pixel_accuracy"] for i in ids)
    pooled = dice_from_counts(sum(per_patient[i]["intersection"] for i in ids),
                              sum(per_patient[i]["predicted"] for i in ids),
                              sum(per_patient[i]["truth"] for i in ids))
    # precision is undefined (nan) for a patient with no predicted tumor: the mean leaves such patients out
    calibration = {"mean_" + k: nanmean(per_patient[i][k] for i in ids) for k in ("precision", "recall", "pred_ratio")}
    return {"mean_dice_3d": mean3, "sd_dice_3d": sd3, **calibration,
            "mean_dice_2d": mean2, "sd_dice_2d": sd2,
            "mean_pixel_accuracy": acc_mean, "sd_pixel_accuracy": acc_sd,
            "pooled_dice": pooled, "patients": len(ids), "slices": len(all2d)}
