"""RTSTRUCT contours of a phantom's mask: closed polygons along pixel boundaries (`trace_boundaries`).

Contours run along the cracks between pixels (vertices at half-pixel coordinates) around each
4-connected component, so no pixel centre lies on a contour and "pixel centre inside polygon"
rasterisation (even-odd or non-zero) gives back the true mask exactly.
"""
import numpy as np

def trace_boundaries(mask2d, holes=True):
    """Closed polygons along the pixel edges around each 4-connected component of a 2D mask.

    Returns a list of (K, 2) float arrays of (x=column, y=row) vertices (pixel centres at integers,
    so vertices lie at half-integers); only corners are kept. At a vertex where two components touch
    diagonally the walk turns towards the foreground, which keeps 4-connected components apart.
    For a mask without holes the polygons are the outer boundaries, and filling them with the
    pixel-centre rule gives back the mask exactly. Hole boundaries (clockwise on screen: positive
    signed area in (x, y-down)) are dropped when `holes` is False.
    """
    mask2d = np.asarray(mask2d, bool)
    rows = np.nonzero(mask2d.any(axis=1))[0]
    if len(rows) == 0:
        return []
    cols = np.nonzero(mask2d.any(axis=0))[0]
    r_off, c_off = rows[0], cols[0]
    m = np.pad(mask2d[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], 1)
    h, w = m.shape
    vw = w + 1                                       # vertices form an (h+1) x (w+1) grid
    # vertical cracks between m[r, j-1] and m[r, j], at vertex column j, rows r..r+1
    r, j = np.nonzero(m[:, 1:] != m[:, :-1])
    j = j + 1
    down = m[r, j]                                   # foreground on the +x side: walk down
    vs = np.where(down, r, r + 1) * vw + j
    ve = np.where(down, r + 1, r) * vw + j
    vd = np.where(down, 1, 3)
    # horizontal cracks between m[i-1, c] and m[i, c], at vertex row i, columns c..c+1
    i, c = np.nonzero(m[1:, :] != m[:-1, :])
    i = i + 1
    left = m[i, c]                                   # foreground below: walk left
    hs = i * vw + np.where(left, c + 1, c)
    he = i * vw + np.where(left, c, c + 1)
    hd = np.where(left, 2, 0)
    start = np.concatenate([vs, hs]).astype(np.int64)
    end = np.concatenate([ve, he]).astype(np.int64)
    dirs = np.concatenate([vd, hd]).astype(np.int64)
    n = len(start)
    if n == 0:
        return []
    key = start * 4 + dirs
    order = np.argsort(key)
    skey = key[order]
    pref = end * 4 + (dirs + 3) % 4                  # the turn towards the foreground
    p = np.minimum(np.searchsorted(skey, pref), n - 1)
    any_ = np.minimum(np.searchsorted(skey, end * 4), n - 1)
    nxt = np.where(skey[p] == pref, order[p], order[any_])
    seen = np.zeros(n, bool)
    polys = []
    nxt_l = nxt.tolist()
    for s in range(n):
        if seen[s]:
            continue
        cyc = []
        e = s
        while not seen[e]:
            seen[e] = True
            cyc.append(e)
            e = nxt_l[e]
        cyc = np.array(cyc)
        d = dirs[cyc]
        corner = d != np.roll(d, 1)
        vtx = start[cyc[corner]]
        poly = np.stack([vtx % vw - 1.5 + c_off, vtx // vw - 1.5 + r_off], 1).astype(np.float64)
        if not holes:
            x, y = poly[:, 0], poly[:, 1]
            if np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y) > 0:
                continue
        polys.append(poly)
    return polys
