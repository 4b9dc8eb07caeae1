"""Dice counts for `caffe test`, as a Caffe Python layer.

This module owns DiceCounts: bottoms score_crop (N x C x H x W scores or probabilities) and label
(N x 1 x H x W); tops dice_intersection, dice_predicted, dice_truth: the batch's counts of pixels
that are predicted tumor and truly tumor, predicted tumor, and truly tumor. Predicted tumor follows
tools/score.py's rule: softmax tumor probability above `threshold` (param_str {"threshold": t}; default
0.5, which for two classes is argmax, the report's rule).

`caffe test` prints the mean of each top over the iterations; all three are divided by the same
iteration count, so the pooled Dice over the tested slices is
    2 * dice_intersection / (dice_predicted + dice_truth).
It has no backward pass (use it with propagate_down: false).
"""
import json

import numpy as np

import caffe

import paper
from tools import score


def dice_counts(scores, labels, threshold=0.5, tumor=paper.TUMOR):
    """(intersection, predicted, truth) pixel counts of the tumor class of N x C x H x W scores."""
    s = np.asarray(scores, dtype=np.float64)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    prob = e[:, tumor] / e.sum(axis=1)
    return score.counts(score.predict(prob, threshold), np.asarray(labels)[:, 0] == tumor)


class DiceCounts(caffe.Layer):
    """Per-batch tumor pixel counts (see the module docstring)."""

    def setup(self, bottom, top):
        if len(bottom) != 2 or len(top) != 3:
            raise ValueError("DiceCounts needs 2 bottoms (scores, label) and 3 tops "
                             "(dice_intersection, dice_predicted, dice_truth)")
        self.threshold = float(json.loads(self.param_str or "{}").get("threshold", 0.5))

    def reshape(self, bottom, top):
        scores, labels = bottom[0].data.shape, bottom[1].data.shape
        want = (scores[0], 1) + tuple(scores[2:])
        if tuple(labels) != want:
            raise ValueError("DiceCounts: label shape %s does not match scores %s (need %s)"
                             % (tuple(labels), tuple(scores), want))
        for i in range(len(top)):  # pycaffe's blob vectors cannot be iterated directly
            top[i].reshape(1)

    def forward(self, bottom, top):
        for i, value in enumerate(dice_counts(bottom[0].data, bottom[1].data, self.threshold)):
            top[i].data[0] = value

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down[i] for i in range(len(bottom))):
            raise ValueError("DiceCounts has no backward pass; set propagate_down: false")
