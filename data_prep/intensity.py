"""Hounsfield units -> the net's input (SPEC §5): owns the HU window, the 3 channels and the FCN means.

hu_to_net: window paper.HU_WINDOW (-2000..4095 HU) mapped linearly to 0..255 and clipped, the grey
copied to 3 channels (Caffe/FCN order: channel 0 = B, 1 = G, 2 = R) and the FCN BGR channel means
paper.FCN_BGR_MEAN subtracted. Another window is one option away (`make_data --hu-window lo,hi`).
net_to_display undoes the means for figures.
"""
from typing import Sequence, Tuple

import numpy as np

import paper


def parse_window(text: str) -> Tuple[float, float]:
    """'lo,hi' -> (lo, hi) with lo < hi (the --hu-window option)."""
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError("HU window must be 'lo,hi' (two numbers), got %r" % (text,))
    if not hi > lo:
        raise ValueError("HU window needs lo < hi, got %r" % (text,))
    return lo, hi


def hu_to_grey(hu, window: Sequence[float] = paper.HU_WINDOW) -> np.ndarray:
    """HU -> 0..255 float32, linear over `window`, clipped."""
    lo, hi = float(window[0]), float(window[1])
    grey = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(grey, 0.0, 255.0, out=grey)


def hu_to_net(hu_crop, window: Sequence[float] = paper.HU_WINDOW) -> np.ndarray:
    """HU crop (H, W) -> float32 (3, H, W); a stack (N, H, W) -> (N, 3, H, W). Means subtracted."""
    grey = hu_to_grey(hu_crop, window)
    mean = np.asarray(paper.FCN_BGR_MEAN, dtype=np.float32).reshape(paper.INPUT_CHANNELS, 1, 1)
    return np.ascontiguousarray(grey[..., None, :, :] - mean, dtype=np.float32)


def net_to_display(x) -> np.ndarray:
    """Net input (3, H, W) (or (..., 3, H, W)) -> grey (H, W) float 0..255 (channel mean of x + means)."""
    x = np.asarray(x, dtype=np.float32)
    mean = np.asarray(paper.FCN_BGR_MEAN, dtype=np.float32).reshape(paper.INPUT_CHANNELS, 1, 1)
    return np.clip((x + mean).mean(axis=-3), 0.0, 255.0)
