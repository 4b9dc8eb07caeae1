"""The phantom cohort: synthetic chest CT patients, each with one lung tumor, written as real files.

Owns the built-in cohort behind `make phantoms`, `make demo` and the tests (issue 4, item 8):

* `make_patient(seed, index, ...)` builds one patient in memory: a chest-like CT volume in HU (body
  with a fat layer and muscle, two lungs at about -850 HU with texture, heart and mediastinum, the
  descending aorta, trachea, spine and ribs at about 700 HU, lung vessels that look like small round
  nodules in a slice -- the distractors of the report's Fig. 9) and one irregular, lobulated tumor
  (1-6 cm, inside a lung, some touching the chest wall) with its true mask.
* `write_patient(folder, patient, kind)` writes it as one of the input formats `make data` reads:
  - "rtstruct": a DICOM CT series (CT Image Storage, int16, RescaleIntercept -1024) and an RT
    Structure Set with ROI "GTV-1" plus one or two other ROIs ("Body", "Lung_L", "Lung_R");
  - "seg": the CT series and a DICOM-SEG (highdicom, BINARY, one segment "GTV", frames shuffled);
  - "nifti": `image.nii.gz` + `mask.nii.gz` (or `.nii`), RAS affine = LPS->RAS flip of the DICOM one;
  - "nrrd": `image.nrrd` + `mask.nrrd`, space left-posterior-superior, same geometry as DICOM.
* `write_cohort(out, n, seed, jobs)` writes N patients `PHANTOM_000`, ... under `out` plus the hidden
  `out/.truth/PHANTOM_000.npz` (true mask (Z,Y,X), slice positions, geometry, SHA-256 of the HU
  volume; readers never look there, and `make data` skips hidden folders).

Geometry (DICOM convention, LPS): voxel (column x, row y, slice z) -> patient mm through
`patient["affine"]`; slices are stored in increasing z (the slice normal (0,0,1) of the axial
orientation 1,0,0,0,1,0). RTSTRUCT contours run along PIXEL BOUNDARIES (the cracks between pixels,
vertices at half-pixel coordinates) around each 4-connected component of the (hole-free) tumor
slice mask, so no pixel centre lies on a contour and the standard "pixel centre inside polygon"
rasterisation (even-odd or non-zero) gives back the true mask exactly.

Everything is deterministic per (seed, index): same voxels, same UIDs (pydicom generate_uid with
entropy from the seed), same file names and bytes. File names are random hex so that readers cannot
rely on their order; InstanceNumber counts from the head (opposite to z) for the same reason.
PatientName / PatientID are fake ("Phantom^000") so that de-identification is exercised.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import time

import numpy as np
from scipy import ndimage

import atomic
import paper

KINDS = ("rtstruct", "seg", "nifti", "nrrd")
VERSION = 2                      # bump when the generated data changes (skip-if-done checks it)
DEFAULT_SIZE = 512               # in-plane pixels (tests use smaller sizes; the FOV stays the same)
SLICES_RANGE = (40, 80)          # inclusive
SLICE_MM_RANGE = (2.5, 5.0)      # slice thickness = spacing, multiples of 0.25 mm
PIXEL_MM_RANGE = (0.6, 0.9)      # pixel spacing at 512 x 512
TUMOR_MM_RANGE = (10.0, 60.0)    # requested largest in-plane extent
TOUCH_WALL_FRACTION = 0.35       # share of tumors placed against the chest wall
HU_MIN, HU_MAX = -1024, 3071     # what int16 stored = HU + 1024 holds in 12 bits
RESCALE_INTERCEPT = -1024
GTV_NAME = "GTV-1"               # RTSTRUCT ROI of the tumor
SEG_LABEL = "GTV"                # DICOM-SEG segment of the tumor
OTHER_ROIS = ("Body", "Lung_L", "Lung_R")
TRUTH_DIR = ".truth"
GZIP_LEVEL = 1                   # NIfTI / NRRD: fast compression (noisy HU barely compresses anyway)
UID_SALT = "ts-fcn-phantom"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"   # referenced SOP class of the study in RTSTRUCT

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


def _uid(seed, index, *parts):
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


# --------------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# contours: pixel-boundary tracing
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------------
def _ds_str(v):
    s = ("%.4f" % v).rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _file_meta(sop_class, sop_instance):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _common(ds, p, uids):
    """Patient, study and equipment attributes shared by every instance of a phantom."""
    num = "%03d" % p["index"]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20160601"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "PH%s" % num
    ds.Manufacturer = "TS-FCN phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Phantom chest CT"
    ds.PatientName = "Phantom^%s" % num
    ds.PatientID = "PHANTOM-%s" % num
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uids["study"]
    ds.StudyID = "1"
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""


def _uids(p):
    s, i, nz = p["seed"], p["index"], p["hu"].shape[0]
    return {"study": _uid(s, i, "study"), "frame": _uid(s, i, "frame"), "ct_series": _uid(s, i, "ct"),
            "ct": [_uid(s, i, "ct", k) for k in range(nz)], "seg_series": _uid(s, i, "segs"),
            "seg": _uid(s, i, "seg"), "rt_series": _uid(s, i, "rts"), "rt": _uid(s, i, "rt")}


def ct_datasets(p, uids=None):
    """The CT series of patient `p` as pydicom Datasets, one per slice, in increasing z."""
    from pydicom.dataset import FileDataset
    uids = uids or _uids(p)
    hu = p["hu"]
    nz, rows, cols = hu.shape
    dz, ps, _ = p["spacing"]
    x0, y0, _ = p["origin"]
    out = []
    for k in range(nz):
        uid = uids["ct"][k]
        ds = FileDataset(None, {}, file_meta=_file_meta(CT_IMAGE_STORAGE, uid), preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        _common(ds, p, uids)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = uid
        ds.Modality = "CT"
        ds.SeriesDescription = "Phantom CT"
        ds.SliceThickness = _ds_str(dz)
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.SeriesInstanceUID = uids["ct_series"]
        ds.SeriesNumber = 2
        ds.InstanceNumber = nz - k                     # head first, opposite to z
        ds.ImagePositionPatient = [_ds_str(x0), _ds_str(y0), _ds_str(p["positions"][k])]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds_str(p["positions"][k])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [_ds_str(ps), _ds_str(ps)]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(RESCALE_INTERCEPT), "1", "HU"
        ds.PixelData = (hu[k].astype("<i2") - np.int16(RESCALE_INTERCEPT)).tobytes()
        out.append(ds)
    return out


def _roi_mask(p, name):
    """Mask (Z, Y, X) bool of one of OTHER_ROIS (its contours keep the outer boundaries only)."""
    if name == "Body":
        m = p["tissue"] != AIR
    else:
        m = p["lung"] | (p["mask"] > 0)
        cols = np.arange(p["size"])
        m &= (cols > p["mid_col"]) if name == "Lung_L" else (cols <= p["mid_col"])
    return m


def _contour_data(xyz):
    """ContourData as a raw DS element: formatting 10^5 numbers through pydicom's DS is slow."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag
    text = "\\".join(map("{:.4f}".format, np.asarray(xyz, np.float64).ravel().tolist())).encode("ascii")
    if len(text) % 2:
        text += b" "
    if len(text) > 0xFFFE:
        raise ValueError("contour too long for an explicit-VR DS element (%d bytes)" % len(text))
    return RawDataElement(Tag(0x30060050), "DS", len(text), text, 0, False, True)


def rtstruct_dataset(p, cts, uids=None):
    """RT Structure Set of GTV-1 and p['rois'], contours along pixel boundaries in patient mm."""
    from pydicom.dataset import Dataset, FileDataset
    from pydicom.sequence import Sequence
    uids = uids or _uids(p)
    ds = FileDataset(None, {}, file_meta=_file_meta(RT_STRUCTURE_SET_STORAGE, uids["rt"]),
                     preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    _common(ds, p, uids)
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = uids["rt"]
    ds.Modality = "RTSTRUCT"
    ds.SeriesDescription = "Phantom structures"
    ds.SeriesInstanceUID = uids["rt_series"]
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "Phantom"
    ds.StructureSetDate, ds.StructureSetTime = "20160601", "120000"

    def image_ref(k):
        r = Dataset()
        r.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        r.ReferencedSOPInstanceUID = cts[k].SOPInstanceUID
        return r

    series = Dataset()
    series.SeriesInstanceUID = uids["ct_series"]
    series.ContourImageSequence = Sequence([image_ref(k) for k in range(len(cts))])
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_COMPONENT_MANAGEMENT
    study.ReferencedSOPInstanceUID = uids["study"]
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = uids["frame"]
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    masks = {GTV_NAME: p["mask"] > 0}
    masks.update({name: _roi_mask(p, name) for name in p["rois"]})
    names = list(masks)
    rng = np.random.default_rng([p["seed"], p["index"], 3])
    names = [names[i] for i in rng.permutation(len(names))]          # GTV is not always the first ROI
    dz, ps, _ = p["spacing"]
    x0, y0, _ = p["origin"]
    colors = {GTV_NAME: [255, 0, 0], "Body": [0, 255, 0], "Lung_L": [0, 128, 255], "Lung_R": [255, 128, 0]}
    kinds = {GTV_NAME: "GTV", "Body": "EXTERNAL"}
    rois, contours, observations = [], [], []
    for number, name in enumerate(names, 1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = uids["frame"]
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        rois.append(roi)
        items = []
        for k in np.nonzero(masks[name].any(axis=(1, 2)))[0]:
            for poly in trace_boundaries(masks[name][k], holes=(name == GTV_NAME)):
                xyz = np.empty((len(poly), 3))
                xyz[:, 0] = x0 + poly[:, 0] * ps
                xyz[:, 1] = y0 + poly[:, 1] * ps
                xyz[:, 2] = p["positions"][k]
                item = Dataset()
                item.ContourImageSequence = Sequence([image_ref(k)])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(poly)
                item[0x30060050] = _contour_data(xyz)
                items.append(item)
        rc = Dataset()
        rc.ROIDisplayColor = colors.get(name, [255, 255, 0])
        rc.ContourSequence = Sequence(items)
        rc.ReferencedROINumber = number
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = kinds.get(name, "ORGAN")
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    return ds


def seg_dataset(p, cts, uids=None):
    """DICOM-SEG (highdicom, BINARY, one segment) of the tumor slices, frames in a shuffled order."""
    import highdicom as hd
    from pydicom.sequence import Sequence
    from pydicom.sr.codedict import codes
    uids = uids or _uids(p)
    ks = np.nonzero(p["mask"].any(axis=(1, 2)))[0]
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEG_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=[cts[k] for k in ks], pixel_array=p["mask"][ks].astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[desc],
        series_instance_uid=uids["seg_series"], series_number=4, sop_instance_uid=uids["seg"],
        instance_number=1, manufacturer="TS-FCN phantom", manufacturer_model_name="phantoms.py",
        software_versions=str(VERSION), device_serial_number="0", omit_empty_frames=True)
    # determinism: highdicom stamps the current date/time and a fresh dimension organisation UID
    seg.ContentDate, seg.ContentTime = "20160601", "120000"
    dim_uid = _uid(p["seed"], p["index"], "dim")
    for item in seg.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = dim_uid
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = dim_uid
    # shuffle the frames (and their per-frame groups) so readers must match them by reference
    nf = int(seg.NumberOfFrames)
    rows, cols = int(seg.Rows), int(seg.Columns)
    bits = np.unpackbits(np.frombuffer(seg.PixelData, np.uint8), bitorder="little")[:nf * rows * cols]
    frames = bits.reshape(nf, rows * cols)
    perm = np.random.default_rng([p["seed"], p["index"], 4]).permutation(nf)
    packed = np.packbits(frames[perm].ravel(), bitorder="little").tobytes()
    seg.PixelData = packed + b"\0" * (len(packed) % 2)
    groups = list(seg.PerFrameFunctionalGroupsSequence)
    seg.PerFrameFunctionalGroupsSequence = Sequence([groups[i] for i in perm])
    return seg


def _mark_encoded(ds):
    """Declare `ds` (and nested items) already in explicit VR little endian, so that pydicom writes
    raw elements as they are instead of converting them (no ambiguous VRs are used here)."""
    ds.set_original_encoding(False, True, ds._character_set)
    for elem in ds.values():
        if getattr(elem, "VR", None) == "SQ" and not getattr(elem, "is_raw", False):
            for item in elem.value:
                _mark_encoded(item)


def _hex_name(rng, ext=".dcm"):
    return "%016x%s" % (int(rng.integers(0, 2 ** 63)), ext)


def _nifti_bytes(img):
    raw = img.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", filename="", mtime=0, compresslevel=GZIP_LEVEL) as gz:
        gz.write(raw)
    return buf.getvalue()


def _drop_nrrd_timestamp(path):
    """pynrrd writes a '# on <date>' comment into the header: remove it for byte-identical output."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.index(b"\n\n")
    lines = [ln for ln in data[:end].split(b"\n") if not ln.startswith(b"# on ")]
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + data[end:])


def write_patient(folder, p, kind=None):
    """Write patient dict `p` into `folder` (created) in the format `kind` (default p['kind']).

    Returns the list of written paths relative to `folder`.
    """
    import pydicom
    kind = kind or p["kind"]
    if kind not in KINDS:
        raise ValueError("kind must be one of %s, got %r" % (KINDS, kind))
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([p["seed"], p["index"], 7])
    written = []

    def dcm(sub, ds, ext):
        rel = os.path.join(sub, _hex_name(rng, ext))
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        if ds.Modality == "RTSTRUCT":
            _mark_encoded(ds)
        pydicom.dcmwrite(os.path.join(folder, rel), ds, write_like_original=False)
        written.append(rel)

    if kind in ("rtstruct", "seg"):
        uids = _uids(p)
        cts = ct_datasets(p, uids)
        study_dir = "%08x" % int(rng.integers(0, 2 ** 31))
        ext = ".dcm" if p["index"] % 3 else ""                         # some files have no extension
        ct_dir = os.path.join(study_dir, "%08x" % int(rng.integers(0, 2 ** 31)))
        for k in rng.permutation(len(cts)):
            dcm(ct_dir, cts[k], ext)
        seg_dir = os.path.join(study_dir, "%08x" % int(rng.integers(0, 2 ** 31)))
        dcm(seg_dir, rtstruct_dataset(p, cts, uids) if kind == "rtstruct" else seg_dataset(p, cts, uids), ext)
    elif kind == "nifti":
        import nibabel as nib
        ext = ".nii" if p["index"] % 14 == 13 else ".nii.gz"
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ p["affine"]
        for name, arr in (("image", p["hu"]), ("mask", p["mask"])):
            img = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), ras)
            img.set_qform(ras, code=1)
            img.set_sform(ras, code=1)
            img.header.set_xyzt_units("mm")
            data = _nifti_bytes(img) if ext.endswith(".gz") else img.to_bytes()
            rel = name + ext
            with atomic.atomic_path(os.path.join(folder, rel)) as tmp:
                with open(tmp, "wb") as f:
                    f.write(data)
            written.append(rel)
    else:
        import nrrd
        dz, ps, _ = p["spacing"]
        header = {"space": "left-posterior-superior",
                  "space directions": np.diag([ps, ps, dz]).astype(np.float64),
                  "space origin": np.array(p["origin"], np.float64),
                  "kinds": ["domain", "domain", "domain"], "encoding": "gzip"}
        for name, arr in (("image", p["hu"]), ("mask", p["mask"])):
            rel = name + ".nrrd"
            with atomic.atomic_path(os.path.join(folder, rel)) as tmp:
                nrrd.write(tmp, np.asfortranarray(arr.transpose(2, 1, 0)), header, index_order="F",
                           compression_level=GZIP_LEVEL)
                _drop_nrrd_timestamp(tmp)
            written.append(rel)
    return written


# --------------------------------------------------------------------------------------------------
# the cohort
# --------------------------------------------------------------------------------------------------
def truth_path(out, index):
    return os.path.join(out, TRUTH_DIR, patient_name(index) + ".npz")


def load_truth(out, index):
    """The truth of phantom `index` under cohort folder `out`: a dict of arrays and scalars."""
    with np.load(truth_path(out, index), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def hu_digest(hu):
    """SHA-256 of an HU volume as C-ordered little-endian int16 (Z, Y, X): compare readers to truth."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(hu).astype("<i2")).tobytes()).hexdigest()


def _params(seed, index, size):
    return {"version": VERSION, "seed": int(seed), "index": int(index), "size": int(size)}


def _done(out, index, seed, size):
    try:
        t = load_truth(out, index)
        return (json.loads(str(t["params"])) == _params(seed, index, size) and
                os.path.isdir(os.path.join(out, patient_name(index))))
    except (OSError, KeyError, ValueError):
        return False


def _make_one(args):
    out, seed, index, size, force, truth_hu = args
    name = patient_name(index)
    if not force and _done(out, index, seed, size):
        return json.loads(str(load_truth(out, index)["summary"]))
    t0 = time.time()
    p = make_patient(seed, index, size=size)
    final = os.path.join(out, name)
    tmp = os.path.join(out, ".%s.tmp%d" % (name, os.getpid()))
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        files = write_patient(tmp, p)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    m = p["mask"].astype(bool)
    ks = np.nonzero(m.any(axis=(1, 2)))[0]
    rows = np.nonzero(m.any(axis=(0, 2)))[0]
    cols = np.nonzero(m.any(axis=(0, 1)))[0]
    dz, ps, _ = p["spacing"]
    summary = {"name": name, "kind": p["kind"], "files": len(files), "slices": int(m.shape[0]),
               "tumor_slices": [int(ks[0]), int(ks[-1])],
               "tumor_extent_mm": round(float(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) * ps), 1),
               "spacing": [dz, ps, ps], "rois": p["rois"] if p["kind"] == "rtstruct" else [],
               "tumor": p["tumor"], "seconds": round(time.time() - t0, 2)}
    arrays = {"mask": p["mask"], "positions": p["positions"], "spacing": np.array(p["spacing"]),
              "origin": np.array(p["origin"]), "affine": p["affine"], "kind": np.array(p["kind"]),
              "hu_sha256": np.array(hu_digest(p["hu"])), "hu_mid": p["hu"][ks[len(ks) // 2]],
              "params": np.array(json.dumps(_params(seed, index, size))),
              "summary": np.array(json.dumps(summary))}
    if truth_hu:
        arrays["hu"] = p["hu"]
    with atomic.atomic_path(truth_path(out, index)) as tmpf:
        np.savez_compressed(tmpf, **arrays)
    return summary


def write_cohort(out, n=20, seed=paper.SEED, jobs=1, size=DEFAULT_SIZE, force=False, truth_hu=False,
                 progress=True):
    """Write phantoms 0..n-1 under `out` (skipping those already done with the same parameters).

    Returns the per-patient summaries (dicts) in index order; also writes out/.truth/cohort.json.
    """
    from tqdm import tqdm
    os.makedirs(os.path.join(out, TRUTH_DIR), exist_ok=True)
    for name in os.listdir(out):                       # folders left by an interrupted run
        if name.startswith(".PHANTOM_") and ".tmp" in name:
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    tasks = [(out, seed, i, size, force, truth_hu) for i in range(n)]
    results = {}
    bar = tqdm(total=n, desc="phantoms", unit="patient", disable=not progress)
    if jobs > 1 and n > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(min(jobs, n)) as pool:
            for s in pool.imap_unordered(_make_one, tasks):
                results[s["name"]] = s
                bar.update(1)
    else:
        for t in tasks:
            s = _make_one(t)
            results[s["name"]] = s
            bar.update(1)
    bar.close()
    summaries = [results[patient_name(i)] for i in range(n)]
    atomic.write_json(os.path.join(out, TRUTH_DIR, "cohort.json"),
                      {"seed": seed, "n": n, "size": size, "version": VERSION, "patients": summaries})
    return summaries


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python3 -m data_prep.phantoms",
        description="Write the built-in phantom cohort: N chest-CT patients, each with one lung tumor, as "
                    "DICOM CT + RTSTRUCT (most), DICOM CT + DICOM-SEG (every 5th), NIfTI or NRRD pairs; "
                    "deterministic per seed. The true masks go to OUT/.truth/ (a hidden folder that "
                    "readers and `make data` ignore).")
    ap.add_argument("--out", required=True, help="output folder (one sub-folder per patient)")
    ap.add_argument("--n", type=int, default=20, help="number of patients (default 20)")
    ap.add_argument("--seed", type=int, default=paper.SEED, help="random seed (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="parallel worker processes (default: CPU count)")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE,
                    help="in-plane pixels (default 512; the field of view stays the same)")
    ap.add_argument("--force", action="store_true", help="rewrite patients that are already done")
    ap.add_argument("--truth-hu", action="store_true",
                    help="also store the full HU volume in .truth/ (large); by default only its SHA-256")
    args = ap.parse_args(argv)
    if args.n < 1 or args.size < 32:
        ap.error("--n must be >= 1 and --size >= 32")
    t0 = time.time()
    summaries = write_cohort(args.out, args.n, args.seed, args.jobs, args.size, args.force, args.truth_hu)
    kinds = {k: sum(s["kind"] == k for s in summaries) for k in KINDS}
    print("%d phantoms in %s (%s) in %.1f s" % (len(summaries), args.out,
          ", ".join("%s %d" % kv for kv in kinds.items() if kv[1]), time.time() - t0), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
