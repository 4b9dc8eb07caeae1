"""Readers: a patient folder (DICOM, NIfTI or NRRD) -> data_prep.scan.Scan with HU and tumor mask.

Public API
- load_patient(folder, roi_regex=paper.ROI_REGEX, patient="P001") -> Scan with image and mask.
  The folder holds either `image.nii|.nii.gz|.nrrd` + `mask.nii|.nii.gz|.nrrd` on the same grid, or
  DICOM files in any sub-folder structure with any names: a CT series plus an RTSTRUCT or DICOM-SEG
  (data_prep.dicom_files finds and classifies the files, data_prep.dicom_series chooses and checks the
  CT series, data_prep.dicom_pixels decodes it, data_prep.dicom_masks reads the segmentation and chooses
  the ROI -- a single ROI is used whatever its name, several matching ROIs are united).
- load_scan(path, patient="scan") -> Scan without mask: a DICOM folder, or a .nii/.nii.gz/.nrrd file.
- load_roi_mask(path, scan, roi_regex=paper.ROI_REGEX) -> uint8 (Z, Y, X) mask on `scan`'s grid,
  from a mask volume, an RTSTRUCT/SEG file, or a folder holding RTSTRUCT/SEG files.
Every refusal is a data_prep.errors.BadInput naming the patient and the file, cleared of every
identifying string the reader knows (DICOM patient names and IDs, the input path and folder name).

NIfTI and NRRD
- NIfTI affines are RAS; they are turned into LPS (x and y negated). NRRD's "space directions" and
  "space origin" are read in the file's space: left-posterior-superior (or no space: assumed LPS,
  the DICOM scanner frame) is used as is, right-anterior-superior is converted to LPS.
- The voxel array is then re-indexed -- flips and axis swaps only, never interpolation -- so that
  columns run to patient left, rows to posterior and slices to superior, and returned as (Z, Y, X):
  the same on-screen layout as a standard axial DICOM series. A volume whose slice axis is still
  oblique by more than 30 deg after that is refused (the toolkit never resamples).
- Image and mask must lie on the same grid: the same voxel centres (within 1% of a voxel), whatever
  axis order or flips each file stores (so a NIfTI/NRRD mask can also go onto a DICOM series).
- The mask is voxel >= 0.5 (labels 1, 2, ... all count as tumor; fractional masks threshold at 0.5).
- An image with NaN or infinite voxels is refused: those voxels have no HU, and any value put there
  (such as air) would be a guess the net then learns from or segments.
"""
import functools
import os

import numpy as np

import paper
from data_prep import dicom_files, dicom_masks, dicom_series
from data_prep.dicom_series import AXIAL_MIN_COS
from data_prep.errors import BadInput, redact
from data_prep.scan import Scan

VOLUME_EXTS = (".nii.gz", ".nii", ".nrrd")
GRID_TOLERANCE = 0.01      # fraction of the smallest voxel side
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --- NIfTI / NRRD --------------------------------------------------------------------------------

def _volume_ext(path):
    low = path.lower()
    for ext in VOLUME_EXTS:
        if low.endswith(ext):
            return ext
    return None


def find_volume(folder, stem):
    """`stem`.nii.gz / .nii / .nrrd in `folder` (case-insensitive), or None."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    for ext in VOLUME_EXTS:
        for n in names:
            if n.lower() == stem + ext and os.path.isfile(os.path.join(folder, n)):
                return n
    return None


def nrrd_space_signs(space, patient, rel):
    """Sign of each world axis to turn the NRRD space into LPS."""
    if space is None:
        return np.ones(3)
    s = str(space).lower().replace("_", "-")
    table = {"left-posterior-superior": (1, 1, 1), "lps": (1, 1, 1),
             "right-anterior-superior": (-1, -1, 1), "ras": (-1, -1, 1),
             "left-anterior-superior": (1, -1, 1), "las": (1, -1, 1),
             "scanner-xyz": (1, 1, 1), "3d-right-handed": (1, 1, 1)}
    if s not in table:
        raise BadInput(patient, rel, "NRRD space %r is not supported (use left-posterior-superior or "
                       "right-anterior-superior)" % space)
    return np.array(table[s], dtype=np.float64)


def nrrd_geometry(header, patient, rel):
    """(4x4 affine of the spatial axes to LPS mm, the spatial axes) of an NRRD header (pynrrd's dict)."""
    dirs = header.get("space directions")
    spatial = [0, 1, 2]
    if dirs is not None:
        dirs = np.array([[np.nan] * 3 if d is None else d for d in dirs], dtype=np.float64)
        spatial = [a for a in range(len(dirs)) if np.all(np.isfinite(dirs[a]))]
        if len(spatial) != 3:
            raise BadInput(patient, rel, "NRRD with %d spatial axes (3 needed)" % len(spatial))
        dirs = dirs[spatial]
        origin = np.array(header.get("space origin", np.zeros(3)), dtype=np.float64)
    else:
        spacings = header.get("spacings")
        dirs = np.diag(np.array(spacings, dtype=np.float64)[:3] if spacings is not None else np.ones(3))
        origin = np.zeros(3)
    affine = np.eye(4)
    affine[:3, :3] = dirs.T                      # column a = direction of axis a
    affine[:3, 3] = origin
    affine[:3] *= nrrd_space_signs(header.get("space"), patient, rel)[:, None]
    return affine, spatial


def _read_volume(path, rel, patient):
    """Voxel array (i, j, k) and its 4x4 affine to LPS mm."""
    ext = _volume_ext(path)
    try:
        if ext == ".nrrd":
            import nrrd
            data, header = nrrd.read(path)
            affine, spatial = nrrd_geometry(header, patient, rel)
            if data.ndim > 3:
                extra = [a for a in range(data.ndim) if a not in spatial]
                if any(data.shape[a] != 1 for a in extra):
                    raise BadInput(patient, rel, "NRRD with a non-spatial axis of size > 1")
                data = data.reshape([data.shape[a] for a in spatial])
            kind = "nrrd"
        else:
            import nibabel as nib
            img = nib.load(path)
            data = np.asanyarray(img.dataobj)
            affine = RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)
            kind = "nifti"
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(patient, rel, "unreadable %s file (%s: %s)" % (ext, type(e).__name__, e))
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise BadInput(patient, rel, "volume of shape %s (a 3-D volume is needed)" % (data.shape,))
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BadInput(patient, rel, "volume without a valid voxel-to-world transform")
    return data, affine, kind


def _display_volume(path, rel, patient):
    """Volume file -> (Z, Y, X) array in (L, P, S) voxel order, its affine, spacing, kind."""
    data, affine, kind = _read_volume(path, rel, patient)
    import nibabel.orientations as nio
    ornt = nio.io_orientation(affine)
    new_affine = affine @ nio.inv_ornt_aff(ornt, data.shape)
    data = nio.apply_orientation(data, ornt)
    spacing = np.linalg.norm(new_affine[:3, :3], axis=0)
    if abs(new_affine[2, 2]) / spacing[2] < AXIAL_MIN_COS:
        raise BadInput(patient, rel, "oblique volume (slice axis %s); the toolkit refuses non-axial volumes "
                       "rather than resampling them" % np.round(new_affine[:3, 2] / spacing[2], 3).tolist())
    zyx = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    return zyx, new_affine, (float(spacing[2]), float(spacing[1]), float(spacing[0])), kind


def _volume_scan(path, rel, patient):
    zyx, affine, spacing, kind = _display_volume(path, rel, patient)
    hu = zyx.astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(hu)))
    if bad:
        raise BadInput(patient, rel, "image with %d NaN or infinite voxel(s) of %d: they have no HU value; "
                       "fill them (e.g. with %g, air, outside the field of view) and rerun"
                       % (bad, hu.size, paper.AIR_HU))
    return Scan(hu=hu, mask=None, spacing=spacing, affine=affine, source_kind=kind)


def on_grid(data, affine, ref_affine, ref_shape):
    """Voxel array `data` (i, j, k) with `affine` re-indexed onto the grid (ref_affine, ref_shape), also (i, j, k),
    when the two are the same grid; None when they are not.

    Same grid means: every voxel centre coincides with one of the reference's (within GRID_TOLERANCE of a
    voxel), i.e. the two index spaces differ only by axis swaps and flips -- whatever order each file stores
    its voxels in (a NIfTI mask drawn on a DICOM series with flipped rows is fine). The one rule for reading
    a mask onto its scan and for writing a result back onto its input's grid (tools/seg_output.py)."""
    t = np.linalg.solve(ref_affine, affine)            # array voxel -> reference voxel
    perm = np.rint(t[:3, :3])
    if not (np.max(np.abs(t[:3, :3] - perm)) <= GRID_TOLERANCE and
            np.array_equal(np.abs(perm).sum(axis=0), np.ones(3)) and
            np.array_equal(np.abs(perm).sum(axis=1), np.ones(3))):
        return None
    src = [int(np.flatnonzero(perm[a])[0]) for a in range(3)]       # array axis feeding reference axis a
    sign = [int(perm[a, src[a]]) for a in range(3)]
    if any(data.shape[src[a]] != ref_shape[a] for a in range(3)):
        return None
    want = np.array([0.0 if sign[a] > 0 else ref_shape[a] - 1 for a in range(3)])
    if np.max(np.abs(t[:3, 3] - want)) > GRID_TOLERANCE:
        return None
    out = np.transpose(data, src)
    return out[tuple(slice(None, None, -1) if sign[a] < 0 else slice(None) for a in range(3))]


def _onto_grid(data, affine, scan, rel, patient):
    """Re-index voxel array `data` (i, j, k) with `affine` onto `scan`'s (Z, Y, X) grid (`on_grid`), or refuse."""
    shape_xyz = scan.hu.shape[::-1]
    out = on_grid(data, affine, scan.affine, shape_xyz)
    if out is None:
        raise BadInput(patient, rel, "mask of shape %s and image of shape %s (voxel order as stored) do "
                       "not share voxel centres: different grids" % (tuple(data.shape), tuple(shape_xyz)))
    return np.ascontiguousarray(np.transpose(out, (2, 1, 0)))


def _volume_mask(path, rel, scan, patient):
    data, affine, _ = _read_volume(path, rel, patient)
    zyx = _onto_grid(data, affine, scan, rel, patient)
    with np.errstate(invalid="ignore"):
        return (np.nan_to_num(zyx.astype(np.float32)) >= 0.5).astype(np.uint8)


# --- DICOM ---------------------------------------------------------------------------------------

def _segmentations(files):
    return [f for f in files if f.kind in ("rtstruct", "seg")]


def _dicom_scan(files, patient, segs=()):
    """The CT Scan of a folder's DICOM files (series referenced by `segs` preferred)."""
    if not any(f.kind == "ct" for f in files):
        raise BadInput(patient, ".", "no CT image series (%d DICOM files, none CT Image Storage)" % len(files))
    referenced = set()
    for s in segs:
        referenced |= dicom_masks.referenced_series(s.header)
    series, hu = dicom_series.read_ct_series(files, patient, referenced)
    headers = [s.file.header for s in series.slices]
    return Scan(hu=hu, mask=None, spacing=series.spacing, affine=series.affine, source_kind="dicom",
                slice_uids=[s.uid for s in series.slices], headers=headers)


def _segs_for(scan, segs):
    """The segmentation objects drawn on the scan's series (all of them when none says so)."""
    uid = str(scan.headers[0].get("SeriesInstanceUID", "")) if scan.headers else ""
    mine = [s for s in segs if uid in dicom_masks.referenced_series(s.header)]
    return mine or list(segs)


# --- public API ----------------------------------------------------------------------------------

def _folder_of(path):
    full = os.path.abspath(os.fspath(path))
    return full if os.path.isdir(full) or not os.path.exists(full) else os.path.dirname(full)


def _public(fn):
    """The public readers' envelope: pydicom's warnings silenced (the readers check what matters
    themselves, and the warnings would echo header values into logs), and every BadInput cleared of
    the identifying strings known when it was raised: the patient names and IDs of the DICOM headers
    read (`seen`, filled by the reader as it goes), the input path (in a library's error text), and
    the input folder's name (in a relative path: a sub-folder named like the patient folder)."""
    @functools.wraps(fn)
    def wrapper(path, *args, **kw):
        seen = []
        try:
            with dicom_files.quiet():
                return fn(path, *args, seen=seen, **kw)
        except BadInput as e:
            e = e.redacted(dicom_files.identities(seen))
            folder = _folder_of(path)
            paths = {os.fspath(path), os.path.abspath(path), os.path.realpath(path), folder}
            raise BadInput(e.patient, _redact_dirs(e.file, os.path.basename(folder)),
                           redact(e.message, paths, ignore_case=False)) from None
    return wrapper


def _redact_dirs(rel, name):
    """A relative path with the folder name `name` removed from its sub-folder names."""
    parts = rel.split(os.sep)
    return os.sep.join([redact(p, {name}, ignore_case=False) for p in parts[:-1]] + parts[-1:])


@_public
def load_patient(folder, roi_regex=paper.ROI_REGEX, patient="P001", seen=None):
    """Image and tumor mask of one patient folder (NIfTI/NRRD pair or DICOM CT + RTSTRUCT/SEG)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise BadInput(patient, ".", "patient folder not found")
    image = find_volume(folder, "image")
    if image is not None:
        mask = find_volume(folder, "mask")
        if mask is None:
            raise BadInput(patient, image, "no segmentation: %s without mask.nii, mask.nii.gz or mask.nrrd" % image)
        scan = _volume_scan(os.path.join(folder, image), image, patient)
        scan.mask = _volume_mask(os.path.join(folder, mask), mask, scan, patient)
        if not scan.mask.any():
            raise BadInput(patient, mask, "empty mask: no voxel >= 0.5")
        return scan
    files = dicom_files.find_dicom(folder, patient)
    seen.extend(f.header for f in files)
    if not files:
        raise BadInput(patient, ".", "no DICOM files and no image.nii/.nii.gz/.nrrd in the folder")
    segs = _segmentations(files)
    if any(f.kind == "ct" for f in files) and not segs:
        raise BadInput(patient, ".", "no segmentation: no RTSTRUCT or DICOM-SEG beside the CT series")
    scan = _dicom_scan(files, patient, segs)
    grid = dicom_masks.Grid.from_scan(scan)
    scan.mask, scan.source_kind = dicom_masks.rasterise(_segs_for(scan, segs), grid, roi_regex, patient)
    return scan


@_public
def load_scan(path, patient="scan", seen=None):
    """The CT image alone: a DICOM folder (the series choice of load_patient) or a volume file."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if _volume_ext(path) is None:
            raise BadInput(patient, os.path.basename(path), "not a .nii, .nii.gz or .nrrd file")
        return _volume_scan(path, os.path.basename(path), patient)
    if not os.path.isdir(path):
        raise BadInput(patient, ".", "scan path not found")
    files = dicom_files.find_dicom(path, patient)
    seen.extend(f.header for f in files)
    if not files:
        image = find_volume(path, "image")
        if image is not None:
            return _volume_scan(os.path.join(path, image), image, patient)
        raise BadInput(patient, ".", "no DICOM files and no image.nii/.nii.gz/.nrrd in the folder")
    return _dicom_scan(files, patient, _segmentations(files))


@_public
def load_roi_mask(path, scan, roi_regex=paper.ROI_REGEX, patient="scan", seen=None):
    """uint8 (Z, Y, X) tumor mask on `scan`'s grid from a mask volume, RTSTRUCT/SEG file or folder."""
    path = os.fspath(path)
    seen.extend(scan.headers or [])
    if os.path.isfile(path) and _volume_ext(path) is not None:
        rel = os.path.basename(path)
        mask = _volume_mask(path, rel, scan, patient)
        if not mask.any():
            raise BadInput(patient, rel, "empty mask: no voxel >= 0.5")
        return mask
    if os.path.isfile(path):
        f = dicom_files.read_header(path, os.path.basename(path), patient)
        seen.extend([f.header] if f is not None else [])
        if f is None or f.kind not in ("rtstruct", "seg"):
            raise BadInput(patient, os.path.basename(path), "not a mask volume, RTSTRUCT or DICOM-SEG")
        segs = [f]
    elif os.path.isdir(path):
        files = dicom_files.find_dicom(path, patient)
        seen.extend(f.header for f in files)
        segs = _segmentations(files)
        if not segs:
            raise BadInput(patient, ".", "no segmentation: no RTSTRUCT or DICOM-SEG in the folder")
        segs = _segs_for(scan, segs)
    else:
        raise BadInput(patient, ".", "mask path not found")
    mask, _ = dicom_masks.rasterise(segs, dicom_masks.Grid.from_scan(scan), roi_regex, patient)
    return mask
