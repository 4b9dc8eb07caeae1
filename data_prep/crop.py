"""The tumor box and the crop: the ONE cropping function of `make data` and `make segment` (SPEC §5).

Owns the box rule, the cut-out with air padding, the resize to the net's 100x100 input and its exact
geometric inverse.

Coordinate convention (pixel centres)
-------------------------------------
Pixel (r, c) of a slice has its centre at continuous coordinates (r, c) and covers
[r - 0.5, r + 0.5] x [c - 0.5, c + 0.5]; rows are the first array axis (y), columns the second (x).
A `Box(row, col, side)` is the square [row - side/2, row + side/2] x [col - side/2, col + side/2] in
those continuous coordinates: (row, col) is its centre (a half-integer when the tumor's extent is
even) and `side` its edge in pixels.

The crop has `size` x `size` pixels that tile the box evenly (area-aligned, like
`align_corners=False`): crop pixel j has its centre at

    y_j = row - side/2 + (j + 0.5) * side / size          (and the same for columns),

where the slice is sampled by linear interpolation (exactly `scipy.ndimage.map_coordinates(order=1)`
on the slice padded with `fill`; linear interpolation is separable, so it is done per axis, vectorised
over slices). Samples outside the slice see `fill` (air, -1000 HU, for images; 0 for labels).
When side == size and the centre is a half-integer (even extent) the crop is an exact copy.

Resize modes (SPEC §7, paper.RESIZE_MODES): "bilinear" (default) samples 2 x 2 neighbours per crop pixel
whatever the reduction; "antialias" widens the triangle filter with the reduction, as PIL's bilinear resize
(behind the report era's scipy.misc.imresize) does: along each axis, crop pixel j averages the slice with
weights max(0, 1 - |x - y_j| / s), s = max(1, side / size), normalised to sum 1 (off-slice positions read
`fill`). For side <= size (no reduction) both modes are the same linear interpolation.

`uncrop` is the inverse map: original pixel r inside the box (row - side/2 <= r <= row + side/2) is
at crop coordinate u = (r - row + side/2) * size / side - 0.5, sampled from the crop by linear
interpolation (clamped to the crop's edge pixels in the half-pixel rims); pixels outside the box get 0.

The box rule: side = max(paper.BOX_MIN_SIDE, paper.BOX_SCALE x the tumor's largest in-plane width or
height), width = max - min + 1 pixels, centre = the midpoint of the tumor's bounding box, moved by
half a pixel (+0.5) where that midpoint would put the edges of an integral-side box on pixel centres
(odd extent): the box edges always lie on pixel edges, so the crop never straddles pixels needlessly. Mode
"patient" (default) takes the largest extent over all tumor slices and the bounding box of the tumor
over the whole patient (one box for all slices); mode "slice" uses each slice's own extent and centre.
"""
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

import paper


@dataclass(frozen=True)
class Box:
    """A square box: centre (row, col) in pixel coordinates, edge `side` in pixels."""
    row: float
    col: float
    side: float

    @property
    def top(self) -> float:
        return self.row - self.side / 2.0

    @property
    def left(self) -> float:
        return self.col - self.side / 2.0

    def to_json(self) -> dict:
        return {"row": float(self.row), "col": float(self.col), "side": float(self.side)}


def box_for_extent(r0, c0, r1, c1, scale=paper.BOX_SCALE, min_side=paper.BOX_MIN_SIDE) -> Box:
    """The training rule for a tumor whose bounding box spans rows r0..r1 and cols c0..c1 (inclusive).

    side = max(min_side, scale x max(r1 - r0 + 1, c1 - c0 + 1)), centred on the bounding box.
    """
    if r1 < r0 or c1 < c0:
        raise ValueError("empty extent rows %s..%s cols %s..%s" % (r0, r1, c0, c1))
    extent = max(r1 - r0 + 1, c1 - c0 + 1)
    side = max(min_side, scale * extent)
    return Box(_on_pixel_edges((r0 + r1) / 2.0, side), _on_pixel_edges((c0 + c1) / 2.0, side), side)


def _on_pixel_edges(mid: float, side: float) -> float:
    """The box centre: `mid`, moved by +0.5 pixel when an integral side would otherwise put the box
    edges on pixel centres (odd extent, even side). The crop grid then lies on the pixel grid: a
    100-side box is an exact copy of the slice, and a label is not dilated by half-pixel ties at the
    0.5 threshold (which would cost ~6% Dice on a 35-pixel tumor's crop -> uncrop round trip)."""
    if float(side) != int(side):
        return mid
    top = mid - side / 2.0
    return mid + 0.5 if top == int(top) else mid


def _first_last(any_zn: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """First and last True index along axis 1 of a (Z, N) boolean array (rows known to have one)."""
    n = any_zn.shape[1]
    first = np.argmax(any_zn, axis=1)
    last = n - 1 - np.argmax(any_zn[:, ::-1], axis=1)
    return first, last


def patient_boxes(mask_zyx, mode=paper.DEFAULT_BOX_MODE, scale=paper.BOX_SCALE,
                  min_side=paper.BOX_MIN_SIDE) -> Dict[int, Box]:
    """Boxes of the tumor slices (slice index -> Box); slices without tumor are left out.

    mode "patient": one box for all slices, side from the largest per-slice width or height,
    centred on the bounding box of the tumor over the whole patient; "slice": each slice's own.
    """
    if mode not in paper.BOX_MODES:
        raise ValueError("box mode %r not in %s" % (mode, paper.BOX_MODES))
    mask = np.asarray(mask_zyx) != 0
    rows_any = mask.any(axis=2)            # (Z, H)
    cols_any = mask.any(axis=1)            # (Z, W)
    zs = np.flatnonzero(rows_any.any(axis=1))
    if zs.size == 0:
        return {}
    r0, r1 = _first_last(rows_any[zs])
    c0, c1 = _first_last(cols_any[zs])
    if mode == "slice":
        return {int(z): box_for_extent(int(a), int(b), int(c), int(d), scale, min_side)
                for z, a, b, c, d in zip(zs, r0, c0, r1, c1)}
    extent = int(max((r1 - r0 + 1).max(), (c1 - c0 + 1).max()))
    side = max(min_side, scale * extent)
    box = Box(_on_pixel_edges((int(r0.min()) + int(r1.max())) / 2.0, side),
              _on_pixel_edges((int(c0.min()) + int(c1.max())) / 2.0, side), side)
    return {int(z): box for z in zs}


def _sample_axis(n_in: int, start: float, side: float, size: int):
    """Indices and weights of linear sampling along one axis: i0, i0 + 1 (may be off the image), t."""
    pos = start + (np.arange(size, dtype=np.float64) + 0.5) * (side / float(size))
    i0 = np.floor(pos).astype(np.int64)
    t = pos - i0
    return i0, i0 + 1, t


def _take(stack: np.ndarray, idx: np.ndarray, axis: int, fill: float) -> np.ndarray:
    """stack.take(idx, axis) with `fill` where idx is outside the axis."""
    n = stack.shape[axis]
    out = np.take(stack, np.clip(idx, 0, n - 1), axis=axis)
    outside = (idx < 0) | (idx >= n)
    if outside.any():
        shape = [1] * out.ndim
        shape[axis] = idx.size
        out = np.where(outside.reshape(shape), np.asarray(fill, dtype=out.dtype), out)
    return out


def _lerp(a, b, t, axis, ndim):
    shape = [1] * ndim
    shape[axis] = t.size
    t = t.reshape(shape).astype(np.float32)
    return (1.0 - t) * a + t * b


def _antialias_weights(n_in: int, start: float, side: float, size: int):
    """Along one axis: (W (size x n_in) weights of the on-slice pixels, their sums (size,)); each crop pixel's
    weights over all positions (on and off the slice) sum to 1."""
    scale = max(1.0, side / float(size))
    centres = start + (np.arange(size, dtype=np.float64) + 0.5) * (side / float(size))
    lo = int(np.floor(centres.min() - scale)) - 1
    hi = int(np.ceil(centres.max() + scale)) + 1
    x = np.arange(lo, hi + 1, dtype=np.float64)
    w = np.maximum(0.0, 1.0 - np.abs(x[None, :] - centres[:, None]) / scale)
    w /= w.sum(axis=1, keepdims=True)
    inside = (x >= 0) & (x < n_in)
    full = np.zeros((size, n_in))
    full[:, x[inside].astype(np.int64)] = w[:, inside]
    return full, full.sum(axis=1)


def _crop_antialias(img: np.ndarray, box: Box, fill: float, size: int) -> np.ndarray:
    h, w = img.shape[-2:]
    wr, ar = _antialias_weights(h, box.top, box.side, size)
    wc, ac = _antialias_weights(w, box.left, box.side, size)
    out = np.einsum("jr,...rc,kc->...jk", wr, img.astype(np.float64), wc, optimize=True)
    out += fill * (1.0 - np.outer(ar, ac))
    return np.ascontiguousarray(out, dtype=np.float32)


def crop_slice(image2d, box: Box, fill=paper.AIR_HU, size=paper.INPUT_SIZE,
               resize=paper.DEFAULT_RESIZE) -> np.ndarray:
    """Cut `box` out of a slice (or a stack (..., H, W) of slices), pad with `fill`, resize to
    size x size (`resize`: "bilinear" or "antialias", see the module docstring). Returns float32 (size, size)
    (or (..., size, size))."""
    img = np.asarray(image2d, dtype=np.float32)
    if img.ndim < 2:
        raise ValueError("crop_slice needs (H, W) or (..., H, W), got shape %s" % (img.shape,))
    if resize not in paper.RESIZE_MODES:
        raise ValueError("resize mode %r not in %s" % (resize, paper.RESIZE_MODES))
    if resize == "antialias" and box.side > size:
        return _crop_antialias(img, box, fill, size)
    h, w = img.shape[-2:]
    ra, rb, rt = _sample_axis(h, box.top, box.side, size)
    ca, cb, ct = _sample_axis(w, box.left, box.side, size)
    ax_r, ax_c = img.ndim - 2, img.ndim - 1
    # Only the columns the samples touch are interpolated along rows (fewer multiplications).
    lo = int(np.clip(ca.min(), 0, w - 1))
    hi = int(np.clip(cb.max(), 0, w - 1)) + 1
    sub = img[..., lo:hi]
    rows = _lerp(_take(sub, ra, ax_r, fill), _take(sub, rb, ax_r, fill), rt, ax_r, img.ndim)
    # Column indices into `sub`; those off the image are mapped past its end so they read `fill`.
    ca_rel = np.where((ca >= 0) & (ca < w), ca - lo, -1)
    cb_rel = np.where((cb >= 0) & (cb < w), cb - lo, -1)
    out = _lerp(_take(rows, ca_rel, ax_c, fill), _take(rows, cb_rel, ax_c, fill), ct, ax_c, img.ndim)
    return np.ascontiguousarray(out, dtype=np.float32)


def crop_label(label2d, box: Box, size=paper.INPUT_SIZE, resize=paper.DEFAULT_RESIZE) -> np.ndarray:
    """The label cut like the image (fill 0, same resize), then >= paper.LABEL_THRESHOLD: uint8."""
    lab = (np.asarray(label2d) != 0).astype(np.float32)
    return (crop_slice(lab, box, fill=0.0, size=size, resize=resize) >= paper.LABEL_THRESHOLD).astype(np.uint8)


def _inverse_axis(n_out: int, start: float, side: float, size: int):
    """Original pixels inside the box along one axis and their linear weights into the crop."""
    first = max(0, int(np.ceil(start - 1e-9)))
    last = min(n_out - 1, int(np.floor(start + side + 1e-9)))
    if last < first:
        return first, first, None, None, None
    r = np.arange(first, last + 1, dtype=np.float64)
    u = np.clip((r - start) * (size / float(side)) - 0.5, 0.0, size - 1.0)
    u0 = np.minimum(np.floor(u).astype(np.int64), size - 2) if size > 1 else np.zeros(r.size, np.int64)
    t = u - u0
    return first, last + 1, u0, np.minimum(u0 + 1, size - 1), t


def uncrop(crop2d, box: Box, shape) -> np.ndarray:
    """Put a size x size crop (or a stack (..., size, size)) back on the original grid `shape` (H, W):
    the exact geometric inverse of `crop_slice` (linear interpolation of the crop), 0 outside the box.
    Returns float32 of shape (..., H, W)."""
    crop = np.asarray(crop2d, dtype=np.float32)
    size = crop.shape[-1]
    if crop.shape[-2] != size:
        raise ValueError("uncrop needs a square crop, got %s" % (crop.shape,))
    h, w = int(shape[-2]), int(shape[-1])
    out = np.zeros(crop.shape[:-2] + (h, w), dtype=np.float32)
    r_lo, r_hi, ra, rb, rt = _inverse_axis(h, box.top, box.side, size)
    c_lo, c_hi, ca, cb, ct = _inverse_axis(w, box.left, box.side, size)
    if rt is None or ct is None:
        return out
    ax_r, ax_c = crop.ndim - 2, crop.ndim - 1
    rows = _lerp(np.take(crop, ra, axis=ax_r), np.take(crop, rb, axis=ax_r), rt, ax_r, crop.ndim)
    vals = _lerp(np.take(rows, ca, axis=ax_c), np.take(rows, cb, axis=ax_c), ct, ax_c, crop.ndim)
    out[..., r_lo:r_hi, c_lo:c_hi] = vals
    return out


def crop_patient(hu_zyx, mask_zyx, boxes: Dict[int, Box], fill=paper.AIR_HU, size=paper.INPUT_SIZE,
                 resize=paper.DEFAULT_RESIZE):
    """Crop every boxed slice of a patient: (images float32 (N, size, size) in HU, labels uint8
    (N, size, size), slices int32 (N,)) in slice order; slices sharing a box are cropped together."""
    zs = sorted(boxes)
    n = len(zs)
    images = np.empty((n, size, size), np.float32)
    labels = np.empty((n, size, size), np.uint8)
    groups: Dict[Box, List[int]] = {}
    for i, z in enumerate(zs):
        groups.setdefault(boxes[z], []).append(i)
    zs_arr = np.asarray(zs, dtype=np.int64)
    for box, idx in groups.items():
        sel = zs_arr[idx]
        images[idx] = crop_slice(np.asarray(hu_zyx)[sel], box, fill=fill, size=size, resize=resize)
        labels[idx] = crop_label(np.asarray(mask_zyx)[sel], box, size=size, resize=resize)
    return images, labels, zs_arr.astype(np.int32)
