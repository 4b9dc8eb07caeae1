"""The report's figures (SPEC §6) as PNGs, drawn with matplotlib (Agg) and written atomically.

  fig5(png, train_log_csv, epoch, profile)   validation mean 3D Dice against iterations (Fig. 5),
                                             with the per-patient curves faint behind it (and the
                                             narrow start's curve before it, when the run had one)
  panels(png, image, prob, pred, truth, title)   Figs. 6/8/9: input, tumor probability, thresholded
                                             prediction, truth, each titled with its pixel count
  fig7(png, image, score15, upscore, prob, title)   Fig. 7: 15x15 tumor score -> upsampled -> probability
  dice_histogram(png, dice_2d, dice_3d, profile)    distribution of per-slice 2D Dice (and 3D per patient)
  dice_groups(png, groups, title)            per-patient 3D Dice of several runs side by side (the folds
                                             of `make cv`, the variants of `make ablation`), mean ± sd

Inputs are network arrays: image 3 x H x W (mean-subtracted, data_prep.intensity.net_to_display
turns it back to grey), probabilities and masks H x W.
"""
import os

import matplotlib.pyplot as plt
import numpy as np

import atomic
import paper
from tools import score, train_log

plt.switch_backend("Agg")   # files only, whatever MPLBACKEND says (tools/__init__.py defaults it to Agg)

DPI = 110


def _save(fig, png):
    with atomic.atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
    plt.close(fig)
    return png


def display_image(image_chw):
    """Grey 0..255 of a network input (the owner's inverse of the intensity mapping)."""
    from data_prep import intensity
    return intensity.net_to_display(image_chw)


def fig5_curves(csv_path):
    """What Fig. 5 draws from a train_log.csv: (iterations, {patient: 3D Dice per point}, mean 3D Dice per
    point), over the rows that have a validation."""
    rows = train_log.validated_rows(csv_path)
    patients = train_log.patient_columns(rows)
    return ([r["iteration"] for r in rows], {k: [r[k] for r in rows] for k in patients},
            [r["val_mean_dice_3d"] for r in rows])


def fig5(png, csv_path, epoch=None, profile="", ceiling=None, narrow_csv=None):
    """Validation mean 3D Dice against iterations (the report's Fig. 5), with the per-patient curves faint
    behind it and, given `ceiling` (the fold's mean resolution ceiling, tools/ceiling.py), a line at it.
    narrow_csv: the train_log.csv of the run's narrow start (tools/train.py), drawn first; the run's own
    iterations follow on from its last."""
    it, patients, mean = fig5_curves(csv_path)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    xlabel, n_it = "iteration", []
    if narrow_csv and os.path.exists(narrow_csv):
        n_it, n_patients, n_mean = fig5_curves(narrow_csv)
        if n_it:
            for ys in n_patients.values():
                ax.plot(n_it, ys, color="0.85", lw=0.8)
            ax.plot(n_it, n_mean, "s-", color="C1", lw=1.5, ms=4, label="narrow start (fc6/fc7 narrower)")
            ax.axvline(n_it[-1], color="0.5", ls="--", lw=0.8)
            it = [n_it[-1] + i for i in it]
            xlabel = "iteration (narrow start, then the widened net)"
    if it:
        for k, ys in patients.items():
            ax.plot(it, ys, color="0.75", lw=0.8)
        ax.plot(it, mean, "o-", color="C0", lw=2, label="mean 3D Dice" + (", widened net" if n_it else ""))
        if patients:
            ax.plot([], [], color="0.75", lw=0.8, label="per patient")
        ax.set_title("Validation 3D Dice: %.3f at iteration %d [%s]" % (mean[-1], it[-1], profile))
        ax.axhline(paper.REPORT_VAL_DICE_3D, color="C3", ls="--", lw=1,
                   label="report, after 5 epochs (%.2f)" % paper.REPORT_VAL_DICE_3D)
        if ceiling is not None:
            ax.axhline(ceiling, color="C2", ls=":", lw=1.5, label="resolution ceiling (%.3f)" % ceiling)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.set_title("Validation 3D Dice: no validation yet [%s]" % profile)
    ax.set_xlabel(xlabel + (" (1 epoch = %d)" % epoch if epoch else ""))
    ax.set_ylabel("mean validation 3D Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if epoch and it:
        sec = ax.secondary_xaxis("top", functions=(lambda x: x * paper.VALIDATIONS_PER_EPOCH / float(epoch),
                                                   lambda x: x * float(epoch) / paper.VALIDATIONS_PER_EPOCH))
        sec.set_xlabel("1/%d epochs (the report's x axis)" % paper.VALIDATIONS_PER_EPOCH)
        ax.set_title(ax.get_title(), pad=12)
    return _save(fig, png)


def panels(png, image_chw, prob, pred, truth, title, threshold=0.5):
    """Figs. 6/8/9: 2 x 2 panels (input, tumor probability, prediction = probability > threshold, truth)."""
    pred = np.asarray(pred) != 0
    truth = np.asarray(truth) != 0
    fig, axes = plt.subplots(2, 2, figsize=(7, 7.4))
    grey = display_image(image_chw)
    axes[0, 0].imshow(grey, cmap="gray", vmin=0, vmax=255)
    axes[0, 0].contour(truth, levels=[0.5], colors="lime", linewidths=0.8)
    axes[0, 0].set_title("input (truth outline)")
    im = axes[0, 1].imshow(prob, cmap="magma", vmin=0, vmax=1)
    axes[0, 1].set_title("tumor probability (> %.2g: %d px)" % (threshold, int((np.asarray(prob) > threshold).sum())))
    fig.colorbar(im, ax=axes[0, 1], fraction=0.046, pad=0.04)
    axes[1, 0].imshow(pred, cmap="gray", vmin=0, vmax=1)
    axes[1, 0].set_title("prediction: %d px" % int(pred.sum()))
    axes[1, 1].imshow(truth, cmap="gray", vmin=0, vmax=1)
    axes[1, 1].set_title("truth: %d px (overlap %d px)" % (int(truth.sum()), int((pred & truth).sum())))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, png)


def fig7(png, image_chw, score15, upscore, prob, title=""):
    """Fig. 7: the 15x15 tumor score, after the bilinear deconvolution + crop, after the softmax."""
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    axes[0].imshow(display_image(image_chw), cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("input %dx%d" % tuple(np.shape(prob)))
    for ax, arr, name, cmap in ((axes[1], score15, "tumor score %dx%d" % np.shape(score15), "viridis"),
                                (axes[2], upscore, "upsampled + crop %dx%d" % np.shape(upscore), "viridis"),
                                (axes[3], prob, "tumor probability", "magma")):
        im = ax.imshow(arr, cmap=cmap, interpolation="nearest",
                       **({"vmin": 0, "vmax": 1} if cmap == "magma" else {}))
        ax.set_title(name)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Fig. 7: score -> deconvolution -> softmax  " + title, fontsize=10)
    fig.tight_layout()
    return _save(fig, png)


def dice_histogram(png, dice_2d, dice_3d=(), profile=""):
    """Histogram of per-slice 2D Dice, with each patient's 3D Dice marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    d2 = np.asarray(list(dice_2d), dtype=float)
    ax.hist(d2, bins=np.linspace(0, 1, 21), color="C0", alpha=0.8, label="2D Dice per slice (%d)" % d2.size)
    for i, d in enumerate(dice_3d):
        ax.axvline(d, color="C3", lw=1, alpha=0.7, label="3D Dice per patient" if i == 0 else None)
    ax.set_xlabel("Dice")
    ax.set_ylabel("slices")
    mean = d2.mean() if d2.size else float("nan")
    ax.set_title("2D Dice distribution: mean %.3f, median %.3f [%s]"
                 % (mean, np.median(d2) if d2.size else float("nan"), profile))
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, png)


def dice_groups(png, groups, title="", xlabel=""):
    """Per-patient 3D Dice of several runs side by side: groups = [(label, {patient: dice})], each a
    column of points (patients) with its mean ± sd; the report's validation 3D Dice dashed."""
    fig, ax = plt.subplots(figsize=(max(4.8, 1.2 * len(groups) + 2), 4))
    rng = np.random.RandomState(0)                       # fixed jitter: the same PNG for the same numbers
    for i, (label, per) in enumerate(groups):
        d = np.asarray(list(per.values()), dtype=float)
        if not d.size:
            continue
        ax.plot(i + rng.uniform(-0.12, 0.12, d.size), d, "o", color="C0", alpha=0.55, ms=5,
                label="patients" if i == 0 else None)
        mean, sd = score.mean_sd(d)
        ax.errorbar(i + 0.25, mean, yerr=sd, fmt="s", color="C1", capsize=4, label="mean ± sd" if i == 0 else None)
    ax.axhline(paper.REPORT_VAL_DICE_3D, color="C3", ls="--", lw=1,
               label="report, validation (%.2f)" % paper.REPORT_VAL_DICE_3D)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g[0] for g in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("3D Dice per patient")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, png)


def dice_vs_size(png, points, title="", ceilings=()):
    """points = [(tumor volume ml, 3D Dice, group label)]: a scatter on a log volume axis, one colour per group;
    ceilings = [(tumor volume ml, ceiling 3D Dice)]: each patient's resolution ceiling as a grey bar."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if len(ceilings):
        xy = np.array(list(ceilings), dtype=float)
        ax.plot(xy[:, 0], xy[:, 1], "_", color="0.35", ms=12, mew=2, label="resolution ceiling")
    labels = sorted({p[2] for p in points})
    for i, label in enumerate(labels):
        xy = np.array([(p[0], p[1]) for p in points if p[2] == label], dtype=float)
        ax.plot(xy[:, 0], xy[:, 1], "o", color="C%d" % (i % 10), alpha=0.8, label=label)
    ax.axhline(paper.REPORT_VAL_DICE_3D, color="C3", ls="--", lw=1,
               label="report, validation (%.2f)" % paper.REPORT_VAL_DICE_3D)
    if points:
        ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("tumor volume (ml)")
    ax.set_ylabel("3D Dice per patient")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, png)


def curves(png, series, title="", ceiling=None):
    """series = [(label, iterations, mean 3D Dice, mean 3D Dice under the other decision rule or None)]:
    validation curves of several runs on one axis (the other rule dashed), the resolution ceiling dotted
    and the report's validation Dice dashed red."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (label, it, dice, other) in enumerate(series):
        color = "C%d" % (i % 10)
        ax.plot(it, dice, "o-", ms=3, lw=1.4, color=color, label=label)
        if other is not None and not np.all(np.isnan(other)):
            ax.plot(it, other, "--", lw=0.9, color=color, alpha=0.8)
    ax.plot([], [], "k--", lw=0.9, label="(dashed: the other decision rule)")
    ax.axhline(paper.REPORT_VAL_DICE_3D, color="C3", ls="--", lw=1, label="report (%.2f)" % paper.REPORT_VAL_DICE_3D)
    if ceiling is not None:
        ax.axhline(ceiling, color="0.3", ls=":", lw=1.5, label="resolution ceiling (%.3f)" % ceiling)
    ax.set_ylim(0, 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean validation 3D Dice")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    return _save(fig, png)
