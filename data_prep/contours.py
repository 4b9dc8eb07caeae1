"""Polygon rasterisation: closed planar contours (pixel coordinates) -> a boolean slice mask.

Rule: a pixel belongs to the mask when its centre lies inside the contours by the even-odd rule, so
several contours on one slice combine by XOR (a contour inside another is a hole; an island inside
a hole is filled again). Pixel (row r, column c) has its centre at (x=c, y=r), the DICOM convention
(ImagePositionPatient is the centre of the first pixel).

The fill is a vectorised scan line: every edge is intersected with the pixel-centre rows it spans
(half-open in y, so a vertex on a row counts once), the crossings are sorted per row, and the
spans between crossing pairs are filled through a running sum. The result equals
matplotlib.path.Path.contains_points on the pixel centres (XORed per contour) wherever a centre is
not exactly on an edge; on an edge the rule is "left/top edges in, right/bottom edges out".
"""
import numpy as np


def fill_polygons(polygons, shape):
    """Even-odd fill of closed polygons, each an (N, 2) array of (x=column, y=row) vertices.

    Returns a bool array of `shape` (rows, columns). Polygons with fewer than 3 vertices are ignored.
    """
    rows, cols = int(shape[0]), int(shape[1])
    out = np.zeros((rows, cols), dtype=bool)
    x0s, y0s, x1s, y1s = [], [], [], []
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(p) < 3:
            continue
        q = np.roll(p, -1, axis=0)
        x0s.append(p[:, 0]); y0s.append(p[:, 1]); x1s.append(q[:, 0]); y1s.append(q[:, 1])
    if not x0s:
        return out
    x0, y0, x1, y1 = (np.concatenate(a) for a in (x0s, y0s, x1s, y1s))
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    # pixel-centre rows r with ylo <= r < yhi, clipped to the image
    r_start = np.maximum(np.ceil(ylo), 0).astype(np.int64)
    r_stop = np.minimum(np.ceil(yhi), rows).astype(np.int64)       # exclusive
    counts = np.maximum(r_stop - r_start, 0)
    total = int(counts.sum())
    if total == 0:
        return out
    edge = np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum(counts) - counts
    r = r_start[edge] + (np.arange(total) - first[edge])
    t = (r - y0[edge]) / (y1[edge] - y0[edge])                      # y0 != y1 where counts > 0
    x = x0[edge] + t * (x1[edge] - x0[edge])
    order = np.lexsort((x, r))
    r, x = r[order], x[order]
    # crossings come in pairs per row (each closed polygon crosses a row an even number of times)
    ra, xa, xb = r[0::2], x[0::2], x[1::2]
    start = np.clip(np.ceil(xa), 0, cols).astype(np.int64)          # first centre >= xa
    stop = np.clip(np.ceil(xb), 0, cols).astype(np.int64)           # first centre >= xb (exclusive)
    keep = stop > start
    ra, start, stop = ra[keep], start[keep], stop[keep]
    diff = np.zeros((rows, cols + 1), dtype=np.int32)
    np.add.at(diff, (ra, start), 1)
    np.add.at(diff, (ra, stop), -1)
    out[:] = np.cumsum(diff[:, :cols], axis=1) > 0
    return out
