"""One phantom patient in memory: a chest-like CT volume in HU and its tumor's true mask (`make_patient`).

Owns the anatomy of the built-in cohort (data_prep/phantoms): body with a fat layer and muscle, two lungs
at about -850 HU with texture, heart and mediastinum, the descending aorta, trachea, spine and ribs at
about 700 HU, lung vessels that look like small round nodules in a slice (the distractors of the report's
Fig. 9), and one irregular, lobulated tumor (1-6 cm, inside a lung, some touching the chest wall); the
geometry (spacing, origin, LPS affine) and the deterministic UIDs of each (seed, index).
"""
import numpy as np
from scipy import ndimage

KINDS = ("rtstruct", "seg", "nifti", "nrrd")
VERSION = 2                      # bump when the generated data changes (skip-if-done checks it)
DEFAULT_SIZE = 512               # in-plane pixels (tests use smaller sizes; the FOV stays the same)
SLICES_RANGE = (40, 80)          # inclusive
SLICE_MM_RANGE = (2.5, 5.0)      # slice thickness = spacing, multiples of 0.25 mm
PIXEL_MM_RANGE = (0.6, 0.9)      # pixel spacing at 512 x 512
TUMOR_MM_RANGE = (10.0, 60.0)    # requested largest in-plane extent
TOUCH_WALL_FRACTION = 0.35       # share of tumors placed against the chest wall
HU_MIN, HU_MAX = -1024, 3071     # what int16 stored = HU + 1024 holds in 12 bits
OTHER_ROIS = ("Body", "Lung_L", "Lung_R")
UID_SALT = "ts-fcn-phantom"


# Tissue labels of the `tissue` map and their mean HU (jittered per patient).
AIR, FAT, MUSCLE, LUNG, SOFT, HEART, BONE, VESSEL, AIRWAY, CSF, DISC, TUMOR = range(12)
TISSUE_NAMES = ("air", "fat", "muscle", "lung", "soft", "heart", "bone", "vessel", "airway", "csf",
                "disc", "tumor")
TISSUE_HU = {AIR: -1000, FAT: -100, MUSCLE: 45, LUNG: -850, SOFT: 35, HEART: 40, BONE: 700,
             VESSEL: 40, AIRWAY: -990, CSF: 10, DISC: 80, TUMOR: 45}


def patient_name(index):
    """Folder name of phantom `index` (an input name, like a hospital's folder)."""
    return "PHANTOM_%03d" % index


def kind_for_index(index):
    """The cohort's format mix: every 7th NIfTI, every 5th DICOM-SEG, index 2, 12, 22... NRRD, else RTSTRUCT."""
    if index % 7 == 6:
        return "nifti"
    if index % 5 == 4:
        return "seg"
    if index % 10 == 2:
        return "nrrd"
    return "rtstruct"


def phantom_uid(seed, index, *parts):
    from pydicom.uid import generate_uid
    return generate_uid(entropy_srcs=[UID_SALT, str(seed), str(index)] + [str(p) for p in parts])


def _interp_matrix(n_out, n_in):
    """(n_out, n_in) linear interpolation weights mapping a coarse 1D grid onto a fine one."""
    pos = np.linspace(0, n_in - 1, n_out)
    i0 = np.minimum(np.floor(pos).astype(int), n_in - 2)
    w = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1 - w
    m[np.arange(n_out), i0 + 1] = w
    return m


class _SmoothNoise:
    """Band-limited 3D noise (std about 1): a coarse normal grid, trilinearly upsampled by matmuls."""

    def __init__(self, rng, shape, cell_mm, spacing):
        nz, ny, nx = shape
        dz, dy, dx = spacing
        gz, gy, gx = (max(2, int(np.ceil(n * d / cell_mm)) + 1) for n, d in zip(shape, spacing))
        self.coarse = rng.standard_normal((gz, gy * gx), dtype=np.float32) * 1.6
        self.gy, self.gx = gy, gx
        self.az, self.ay, self.ax = _interp_matrix(nz, gz), _interp_matrix(ny, gy), _interp_matrix(nx, gx)

    def slab(self, z0, z1):
        t = (self.az[z0:z1] @ self.coarse).reshape(z1 - z0, self.gy, self.gx)
        return np.matmul(np.matmul(self.ay, t), self.ax.T)


def _geometry(rng, size, n_slices):
    ps512 = float(rng.uniform(*PIXEL_MM_RANGE))
    ps = round(ps512 * DEFAULT_SIZE / size, 4)
    nz = int(n_slices) if n_slices else int(rng.integers(SLICES_RANGE[0], SLICES_RANGE[1] + 1))
    dz = float(np.round(rng.uniform(*SLICE_MM_RANGE) * 4) / 4)
    x0 = round(-(size - 1) / 2.0 * ps + float(rng.uniform(-8, 8)), 2)
    y0 = round(-(size - 1) / 2.0 * ps + float(rng.uniform(-8, 8)), 2)
    z0 = round(float(rng.uniform(-320, -120)), 2)
    return nz, ps, dz, (x0, y0, z0)


def _anatomy(rng, size, ps, nz, dz):
    """Tissue labels (Z, Y, X) uint8, the lung region (bool, both lungs, before vessels) and the
    mediastinum centre column in mm from the image centre (left/right lung split)."""
    fov = size * ps
    c = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * ps
    u, v = np.meshgrid(c, c)                       # u: columns (patient left +), v: rows (posterior +)
    bx, by = float(rng.uniform(-10, 10)), float(rng.uniform(-5, 12))
    a = min(float(rng.uniform(140, 175)), 0.46 * fov)
    b = a * float(rng.uniform(0.62, 0.74))
    fat, muscle, rib_t = float(rng.uniform(5, 18)), float(rng.uniform(5, 10)), float(rng.uniform(7, 10))
    du, dv = u - bx, v - by

    def superellipse(ea, eb, p=2.4):
        return (np.abs(du / ea) ** p + np.abs(dv / eb) ** p) <= 1.0

    body = superellipse(a, b)
    inner = superellipse(a - fat, b - fat)
    ca, cb = a - fat - muscle - rib_t, b - fat - muscle - rib_t          # thoracic cavity
    rc = np.sqrt((du / ca) ** 2 + (dv / cb) ** 2)
    cavity = rc < 1.0
    ring = (rc >= 1.0) & (rc < 1.0 + rib_t / min(ca, cb) * 0.9)
    alpha = np.abs(np.arctan2(du, dv))                                  # 0 at the back, pi at the front
    # ribs run obliquely: an axial slice cuts each one into a short arc, several per side
    rib_pitch, rib_phase, rib_slope = float(rng.uniform(24, 32)), float(rng.uniform(0, 2 * np.pi)), 12.0
    rib_zone = ring & (alpha > 0.12 * np.pi) & (alpha < 0.85 * np.pi)

    mx = bx + 0.05 * ca
    mw = ca * (0.15 + 0.10 * np.clip(-dv / cb, 0, 1))
    medi = cavity & (np.abs(u - mx) < mw)
    medi_fat = medi & (rng.standard_normal() + np.sin(u / 9.0) * np.cos(v / 11.0) > 0.9)
    hc = (bx + 0.18 * ca, by - 0.22 * cb)
    hr = np.sqrt(((u - hc[0]) / (0.42 * ca)) ** 2 + ((v - hc[1]) / (0.5 * cb)) ** 2)
    rv = float(rng.uniform(14, 18))
    vc = (bx, by + 0.85 * cb)
    dvert = np.hypot(u - vc[0], v - vc[1])
    canal_c = (vc[0], vc[1] + rv + 8)
    dcanal = np.hypot(u - canal_c[0], v - canal_c[1])
    posterior = ((dcanal < 14) & (v > canal_c[1] - 3)) | ((np.abs(u - bx) < 4) & (v > canal_c[1]) &
                                                           (v < canal_c[1] + 35))
    spine = body & ((dvert < rv) | posterior) & ~(dcanal < 7)
    canal = dcanal < 7
    ao_r = float(rng.uniform(10, 13))
    aorta = np.hypot(u - (bx + rv + ao_r + 3), v - (vc[1] - 0.3 * rv)) < ao_r
    trachea_c = (bx, vc[1] - rv - 18)
    dtr = np.hypot(u - trachea_c[0], v - trachea_c[1])
    sternum = ((((u - bx) / 14.0) ** 2 + ((v - (by - cb - rib_t / 2)) / 6.0) ** 2) < 1.0)

    base = np.full((size, size), AIR, np.uint8)
    base[body] = FAT
    base[inner] = MUSCLE
    base[cavity] = SOFT
    base[medi_fat] = FAT
    # overlays drawn over everything else, as flat indices and labels (fast per-slice painting)
    over = np.full((size, size), 255, np.uint8)
    over[aorta] = VESSEL
    over[spine] = BONE
    over[canal & body] = CSF
    over_idx = np.flatnonzero(over != 255)
    over_val = over.ravel()[over_idx]
    disc_val = np.where(over_val == BONE, DISC, over_val).astype(np.uint8)
    tr_idx = np.flatnonzero(dtr < 10)
    tr_val = np.where(dtr.ravel()[tr_idx] < 8, AIRWAY, SOFT).astype(np.uint8)
    st_idx = np.flatnonzero(sternum)
    rz_idx = np.flatnonzero(rib_zone)
    rz_alpha = alpha.ravel()[rz_idx]
    cav_idx = np.flatnonzero(cavity)
    cav_rc, cav_hr = rc.ravel()[cav_idx], hr.ravel()[cav_idx]
    cav_free = ~(medi | aorta | (dvert < rv + 4)).ravel()[cav_idx]
    lab = np.empty((nz, size, size), np.uint8)
    lung3d = np.zeros((nz, size, size), bool)
    for k in range(nz):
        z = k * dz
        t = k / max(nz - 1, 1)                                          # 0 = inferior, 1 = superior
        s = float(np.clip(min(0.78 + 2.5 * t, 1.0, 1.0 - 1.2 * (t - 0.72)), 0.55, 1.0))
        sl = lab[k].reshape(-1)
        sl[:] = base.ravel()
        ribs = np.cos(2 * np.pi * z / rib_pitch + rib_slope * rz_alpha + rib_phase) > 0.45
        sl[rz_idx[ribs]] = BONE
        if 0.25 < t < 0.95:
            sl[st_idx] = BONE
        hs = np.sqrt(max(0.0, 1.0 - ((t - 0.28) / 0.3) ** 2))
        if hs < 0.05:
            hs = 0.0
        lung = cav_free & (cav_rc < s) & (cav_hr >= hs * 1.1)
        sl[cav_idx[lung]] = LUNG
        lung3d[k].reshape(-1)[cav_idx[lung]] = True
        sl[cav_idx[cav_hr < hs * 1.1]] = FAT
        sl[cav_idx[cav_hr < hs]] = HEART
        if t > 0.6:
            sl[tr_idx] = tr_val
        sl[over_idx] = disc_val if (z % 30.0) < 5.0 else over_val
    return lab, lung3d, mx


def _paint_vessels(rng, lab, lung3d, ps, dz):
    """Tubes running mostly along z through the lungs: small round blobs in any one slice."""
    nz, size, _ = lab.shape
    mid = lung3d[nz // 2]
    rr, cc = np.nonzero(mid)
    if len(rr) == 0:
        return
    n = int(rng.integers(40, 70))
    pick = rng.integers(0, len(rr), n)
    zk = np.arange(nz) * dz
    for i in range(n):
        r0, c0 = rr[pick[i]], cc[pick[i]]
        rad = float(rng.uniform(1.5, 4.5))
        amp_u, amp_v = rng.uniform(3, 15, 2)
        per, ph = float(rng.uniform(80, 250)), rng.uniform(0, 2 * np.pi, 2)
        k0 = int(rng.integers(0, nz // 2))
        k1 = int(rng.integers(nz // 2, nz + 1))
        cu = c0 + amp_u / ps * np.sin(2 * np.pi * zk / per + ph[0])
        cv = r0 + amp_v / ps * np.sin(2 * np.pi * zk / per + ph[1])
        rp = rad / ps
        h = int(np.ceil(rp)) + 1
        for k in range(k0, k1):
            ci, ri = int(round(cu[k])), int(round(cv[k]))
            ra, rb, ca_, cb_ = max(ri - h, 0), min(ri + h + 1, size), max(ci - h, 0), min(ci + h + 1, size)
            if ra >= rb or ca_ >= cb_:
                continue
            yy, xx = np.ogrid[ra:rb, ca_:cb_]
            disk = (yy - cv[k]) ** 2 + (xx - cu[k]) ** 2 <= rp * rp
            win = lab[k, ra:rb, ca_:cb_]
            win[disk & lung3d[k, ra:rb, ca_:cb_]] = VESSEL


def _blob_field(rng):
    """A lobulated unit blob: metaball field of a core and 2-5 lobes plus smooth surface noise."""
    k = int(rng.integers(2, 6))
    dirs = rng.standard_normal((k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    centres = np.vstack([np.zeros((1, 3)), dirs * rng.uniform(0.3, 0.55, (k, 1))])
    sigmas = np.concatenate([[rng.uniform(0.4, 0.5)], rng.uniform(0.18, 0.32, k)])
    weights = np.concatenate([[1.0], rng.uniform(0.7, 1.0, k)])
    bumps = rng.standard_normal((7, 7, 7)).astype(np.float32)

    def field(p):                                   # p: (..., 3) unit coordinates (z, y, x)
        f = np.zeros(p.shape[:-1], np.float32)
        for cen, sg, w in zip(centres, sigmas, weights):
            d2 = ((p - cen.astype(np.float32)) ** 2).sum(-1)
            f += w * np.exp(-d2 / (2 * sg * sg))
        g = (np.clip(p, -1.5, 1.5) + 1.5) / 3.0 * 6.0
        f += 0.1 * ndimage.map_coordinates(bumps, np.moveaxis(g, -1, 0), order=1, mode="nearest")
        return f
    return field


def _tumor(rng, lung3d, ps, dz, tumor_mm, mx_pix):
    """Place one lobulated tumor inside a lung; returns its mask (Z, Y, X) uint8 and a summary."""
    nz, size, _ = lung3d.shape
    field = _blob_field(rng)
    g = np.linspace(-1.5, 1.5, 41, dtype=np.float32)
    unit = field(np.stack(np.meshgrid(g, g, g, indexing="ij"), -1)) > 0.5
    idx = [np.nonzero(unit.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
    ext = [(i[-1] - i[0] + 1) * (g[1] - g[0]) for i in idx]             # (z, y, x) unit extents
    diameter = float(tumor_mm) if tumor_mm else float(rng.uniform(*TUMOR_MM_RANGE))
    s_xy = diameter / max(ext[1], ext[2])
    s_z = max(s_xy, 3.5 * dz / ext[0])
    half_xy, half_z = 1.5 * s_xy, 1.5 * s_z                              # mm half-sizes of the box
    hz = int(np.ceil(half_z / dz))
    kc = int(rng.integers(min(hz // 2 + 1, nz // 2), max(nz - hz // 2 - 1, nz // 2 + 1)))
    lung2d = lung3d[kc]
    side = int(rng.integers(0, 2))
    cols = np.arange(size)[None, :]
    lung_side = lung2d & ((cols > mx_pix) if side else (cols <= mx_pix))
    if not lung_side.any():
        lung_side = lung2d
    dist = ndimage.distance_transform_edt(lung_side) * ps                # mm to the nearest non-lung
    wall_dist = ndimage.distance_transform_edt(lung_side | (np.abs(cols - mx_pix) * ps < 40)) * ps
    r_in = diameter / 2.0
    touch = rng.random() < TOUCH_WALL_FRACTION
    if touch:
        cand = lung_side & (wall_dist > 0.45 * r_in) & (wall_dist < 0.85 * r_in) & (dist > 0)
    else:
        cand = lung_side & (dist > r_in + 3.0)
    if not cand.any():
        cand = dist >= dist.max() * 0.9
    rr, cc = np.nonzero(cand)
    j = int(rng.integers(0, len(rr)))
    rcen, ccen = int(rr[j]), int(cc[j])
    hxy = int(np.ceil(half_xy / ps))
    r0, r1 = max(rcen - hxy, 0), min(rcen + hxy + 1, size)
    c0, c1 = max(ccen - hxy, 0), min(ccen + hxy + 1, size)
    k0, k1 = max(kc - hz, 0), min(kc + hz + 1, nz)
    zz, yy, xx = np.meshgrid((np.arange(k0, k1) - kc) * dz / s_z, (np.arange(r0, r1) - rcen) * ps / s_xy,
                             (np.arange(c0, c1) - ccen) * ps / s_xy, indexing="ij")
    blob = field(np.stack([zz, yy, xx], -1).astype(np.float32)) > 0.5
    blob &= lung3d[k0:k1, r0:r1, c0:c1]
    lbl, n = ndimage.label(blob)
    if n > 1:
        sizes = ndimage.sum(blob, lbl, index=np.arange(1, n + 1))
        blob = lbl == (1 + int(np.argmax(sizes)))
    for k in range(blob.shape[0]):
        if blob[k].any():
            blob[k] = ndimage.binary_fill_holes(blob[k], structure=np.ones((3, 3), bool))
    mask = np.zeros(lung3d.shape, np.uint8)
    mask[k0:k1, r0:r1, c0:c1] = blob
    touches = bool((ndimage.binary_dilation(blob, iterations=1) & ~lung3d[k0:k1, r0:r1, c0:c1]).any())
    info = {"requested_mm": round(diameter, 2), "centre_slice": kc, "centre_rc": [rcen, ccen],
            "lung": "left" if side else "right", "placed_at_wall": bool(touch), "touches_non_lung": touches}
    return mask, info


def _noise(rng, shape, sigma):
    """Zero-mean noise of std `sigma` (float32): a sum of two uniform bytes, near-Gaussian and cheap."""
    b = np.frombuffer(rng.bytes(2 * int(np.prod(shape))), np.uint8).reshape((2,) + tuple(shape))
    n = b[0].astype(np.float32)
    n += b[1]
    n -= 255.0
    n *= np.float32(sigma / 104.52)
    return n


def make_patient(seed, index, kind=None, n_slices=None, tumor_mm=None, size=DEFAULT_SIZE):
    """One phantom patient in memory (no files).

    Returns a dict: hu int16 (Z, Y, X) (HU, what the DICOM decodes to), mask uint8 (Z, Y, X),
    tissue uint8 (Z, Y, X) labels (TISSUE_NAMES), spacing (dz, dy, dx) mm, origin (x, y, z) LPS mm of
    voxel (0, 0, 0), positions (z of each slice, increasing), affine 4x4 (col, row, slice) -> LPS,
    kind, name, seed, index, size, tumor (placement summary), rois (other ROI names for RTSTRUCT).
    """
    kind = kind or kind_for_index(index)
    if kind not in KINDS:
        raise ValueError("kind must be one of %s, got %r" % (KINDS, kind))
    rng = np.random.default_rng([int(seed), int(index), 20160601])
    nz, ps, dz, origin = _geometry(rng, int(size), n_slices)
    lab, lung3d, mx = _anatomy(rng, int(size), ps, nz, dz)
    _paint_vessels(rng, lab, lung3d, ps, dz)
    mx_pix = (mx / ps) + (size - 1) / 2.0
    mask, tinfo = _tumor(rng, lung3d, ps, dz, tumor_mm, mx_pix)
    lab[mask.astype(bool)] = TUMOR

    lut = np.array([TISSUE_HU[i] for i in range(len(TISSUE_NAMES))], np.float32)
    lut[LUNG] += rng.uniform(-30, 30)
    lut[TUMOR] = rng.uniform(30, 60)
    lut[FAT] += rng.uniform(-15, 15)
    sigma = float(rng.uniform(8, 16))
    tex = _SmoothNoise(rng, lab.shape, 9.0, (dz, ps, ps))
    amp = np.zeros(len(TISSUE_NAMES), np.float32)
    amp[LUNG], amp[TUMOR] = 30, 8
    hu = np.empty(lab.shape, np.int16)
    for z0 in range(0, nz, 16):
        z1 = min(z0 + 16, nz)
        lb = lab[z0:z1]
        h = np.take(lut, lb)
        h += tex.slab(z0, z1) * np.take(amp, lb)
        s = h * 0.5                                                   # in-plane [1 2 1] / 4 blur
        s[:, 1:] += 0.25 * h[:, :-1]
        s[:, :-1] += 0.25 * h[:, 1:]
        s[:, 0] += 0.25 * h[:, 0]
        s[:, -1] += 0.25 * h[:, -1]
        h = s * 0.5
        h[:, :, 1:] += 0.25 * s[:, :, :-1]
        h[:, :, :-1] += 0.25 * s[:, :, 1:]
        h[:, :, 0] += 0.25 * s[:, :, 0]
        h[:, :, -1] += 0.25 * s[:, :, -1]
        h += _noise(rng, h.shape, sigma)
        np.rint(h, out=h)
        np.clip(h, HU_MIN, HU_MAX, out=h)
        hu[z0:z1] = h
    positions = origin[2] + dz * np.arange(nz)
    affine = np.array([[ps, 0, 0, origin[0]], [0, ps, 0, origin[1]], [0, 0, dz, origin[2]], [0, 0, 0, 1]],
                      np.float64)
    rng_roi = np.random.default_rng([int(seed), int(index), 5])         # same ROIs whatever the size
    n_other = int(rng_roi.integers(1, 3))
    rois = [OTHER_ROIS[i] for i in sorted(rng_roi.choice(len(OTHER_ROIS), n_other, replace=False))]
    return {"hu": hu, "mask": mask, "tissue": lab, "lung": lung3d, "spacing": (dz, ps, ps),
            "origin": tuple(origin), "positions": positions, "affine": affine, "kind": kind,
            "name": patient_name(index), "seed": int(seed), "index": int(index), "size": int(size),
            "tumor": tinfo, "rois": rois, "mid_col": float(mx_pix)}
