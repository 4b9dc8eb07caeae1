"""DICOM segmentations onto a CT grid: RTSTRUCT contours and DICOM-SEG frames -> a (Z, Y, X) mask.

What it owns
- ROI choice (also for several segmentation objects together): a single ROI / segment in total is
  used whatever its name; otherwise every ROI whose name matches the regex (case-insensitive
  search) is used, and their UNION is the tumor mask (e.g. "GTV-1" + "GTV-2" of a patient with two
  lesions); none matching is an error listing the names present.
- Frame of reference: a segmentation drawn in another frame of reference than the CT series (the
  RTSTRUCT ROIs' ReferencedFrameOfReferenceUID, else its ReferencedFrameOfReferenceSequence; the
  SEG's FrameOfReferenceUID) is refused: its coordinates mean other places, and its labels would
  land on the wrong slices. Objects that carry no frame of reference, or a scan without one
  (NIfTI/NRRD), are not compared.
- One placement rule for contours and SEG frames: each lies on the slice within half a slice
  spacing of its position along the normal; one further from every slice is refused, and so is
  one whose referenced image (ContourImageSequence / derivation source) is another slice. Without a
  position (SEG frames without PlanePositionSequence) the referenced image decides.
- RTSTRUCT: each CLOSED_PLANAR contour (patient LPS mm) goes to one slice by that rule. Points become
  (column, row) pixel coordinates with the slice's own ImagePositionPatient and the row/column
  cosines, and data_prep.contours.fill_polygons fills them (pixel centre inside, even-odd, so
  several contours of a slice XOR and holes work). A contour off every slice is an error.
- DICOM-SEG: frames go to slices by the ReferencedSOPInstanceUID of their derivation source image,
  else by their ImagePositionPatient along the normal, whatever the frame order. The frames must
  lie on the CT grid (same rows/columns, orientation, pixel spacing, in-plane origin).
  BINARY frames are used as is, FRACTIONAL ones thresholded at 0.5 of MaximumFractionalValue.
"""
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import pydicom

from data_prep import contours
from data_prep.dicom_files import find_in_groups, quiet
from data_prep.errors import BadInput

IN_PLANE_TOLERANCE = 0.1   # pixels: a SEG frame origin further off the CT grid is another grid


@dataclass
class Grid:
    """Where each voxel of a scan is in patient space (enough to map LPS points to voxels)."""
    rows: int
    cols: int
    positions: np.ndarray     # (Z, 3) LPS centre of the first pixel of each slice
    row_cos: np.ndarray       # direction of increasing column index
    col_cos: np.ndarray       # direction of increasing row index
    dx: float
    dy: float
    dz: float
    normal: np.ndarray
    depths: np.ndarray        # positions . normal (ascending)
    uid_index: Dict[str, int]  # SOPInstanceUID -> slice (only UIDs naming exactly one slice)
    frame_uid: Optional[str] = None   # the CT's FrameOfReferenceUID (DICOM scans)

    @classmethod
    def from_scan(cls, scan):
        z, rows, cols = scan.hu.shape
        a = np.asarray(scan.affine, dtype=np.float64)
        dx, dy = float(np.linalg.norm(a[:3, 0])), float(np.linalg.norm(a[:3, 1]))
        row_cos, col_cos = a[:3, 0] / dx, a[:3, 1] / dy
        normal = np.cross(row_cos, col_cos)
        normal /= np.linalg.norm(normal)
        positions = (a @ np.c_[np.zeros((z, 2)), np.arange(z), np.ones(z)].T).T[:, :3]
        if scan.headers and len(scan.headers) == z:
            ipp = [h.get("ImagePositionPatient") for h in scan.headers]
            if all(p is not None for p in ipp):          # classic CT: the exact positions
                positions = np.array([[float(v) for v in p] for p in ipp])
        uid_index = {}
        if scan.slice_uids:
            counts = {}
            for u in scan.slice_uids:
                counts[u] = counts.get(u, 0) + 1
            uid_index = {u: k for k, u in enumerate(scan.slice_uids) if counts[u] == 1}
        frame_uid = str(scan.headers[0].get("FrameOfReferenceUID", "") or "").strip() if scan.headers else ""
        return cls(rows=rows, cols=cols, positions=positions, row_cos=row_cos, col_cos=col_cos,
                   dx=dx, dy=dy, dz=float(scan.spacing[0]), normal=normal, depths=positions @ normal,
                   uid_index=uid_index, frame_uid=frame_uid or None)

    def slice_at(self, depth):
        """Nearest slice to a plane at `depth` mm along the normal, or None beyond half a step."""
        k = int(np.argmin(np.abs(self.depths - depth)))
        return k if abs(self.depths[k] - depth) <= 0.5 * self.dz + 1e-3 else None

    def in_plane(self, points, k):
        """(N, 3) LPS points -> (N, 2) (column, row) pixel coordinates in slice k."""
        d = points - self.positions[k]
        return np.c_[d @ self.row_cos / self.dx, d @ self.col_cos / self.dy]


# --- ROI choice ----------------------------------------------------------------------------------

def select_rois(names, roi_regex, patient, rel):
    """Keys of the ROIs to use from {key: name}: the only one, or all whose name matches."""
    if len(names) == 1:
        return list(names)
    pattern = re.compile(roi_regex, re.IGNORECASE)
    chosen = [k for k, n in names.items() if pattern.search(n)]
    if not chosen:
        raise BadInput(patient, rel, "no ROI matches /%s/ (ROIs present: %s)"
                       % (roi_regex, ", ".join("'%s'" % n for n in names.values()) or "none"))
    return chosen


def referenced_series(ds):
    """SeriesInstanceUIDs a RTSTRUCT or SEG says it was drawn on."""
    uids = set()
    for fr in ds.get("ReferencedFrameOfReferenceSequence") or []:
        for st in fr.get("RTReferencedStudySequence") or []:
            for se in st.get("RTReferencedSeriesSequence") or []:
                if "SeriesInstanceUID" in se:
                    uids.add(str(se.SeriesInstanceUID))
    for se in ds.get("ReferencedSeriesSequence") or []:
        if "SeriesInstanceUID" in se:
            uids.add(str(se.SeriesInstanceUID))
    return uids


def frames_of_reference(f, numbers):
    """FrameOfReferenceUIDs segmentation file `f` declares for its ROIs/segments `numbers`."""
    ds = f.header
    uids = set()
    if f.kind == "rtstruct":
        for r in ds.get("StructureSetROISequence") or []:
            if int(r.get("ROINumber", -1)) in numbers and str(r.get("ReferencedFrameOfReferenceUID", "")).strip():
                uids.add(str(r.ReferencedFrameOfReferenceUID).strip())
        if not uids:
            for fr in ds.get("ReferencedFrameOfReferenceSequence") or []:
                if str(fr.get("FrameOfReferenceUID", "")).strip():
                    uids.add(str(fr.FrameOfReferenceUID).strip())
    elif str(ds.get("FrameOfReferenceUID", "")).strip():
        uids.add(str(ds.FrameOfReferenceUID).strip())
    return uids


def check_frame_of_reference(f, numbers, grid, patient):
    """Refuse a segmentation drawn in another frame of reference than the CT series."""
    if not grid.frame_uid:
        return
    uids = frames_of_reference(f, numbers)
    if uids and grid.frame_uid not in uids:
        raise BadInput(patient, f.rel, "%s drawn in another frame of reference than the CT series (its "
                       "FrameOfReferenceUID differs from the CT's): its coordinates would put the labels on "
                       "the wrong slices" % ("RTSTRUCT" if f.kind == "rtstruct" else "DICOM-SEG"))


def roi_names(f):
    """{(rel, number): name} of the ROIs of one RTSTRUCT or segments of one SEG (header only)."""
    ds = f.header
    if f.kind == "rtstruct":
        return {(f.rel, int(r.ROINumber)): str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence") or []}
    return {(f.rel, int(s.SegmentNumber)): str(s.get("SegmentLabel", "")) for s in ds.get("SegmentSequence") or []}


# --- RTSTRUCT ------------------------------------------------------------------------------------

def _contour_points(item):
    """ContourData as (N, 3), parsed from the raw bytes when possible (much faster than DS values)."""
    elem = item.get_item(0x30060050)
    if elem is None:
        return np.zeros((0, 3))
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        pts = np.array(value.replace(b"\\", b" ").split(), dtype=np.float64)
    else:
        try:
            pts = np.array([float(v) for v in value], dtype=np.float64)
        except TypeError:   # a single value
            pts = np.array([float(value)])
    return pts[: len(pts) // 3 * 3].reshape(-1, 3)


def rasterise_rtstruct(f, numbers, grid, patient, mask):
    """OR the ROIs `numbers` of RTSTRUCT file `f` on `grid` into bool `mask` (Z, Y, X)."""
    per_slice: Dict[int, List[np.ndarray]] = {}
    for rc in f.header.get("ROIContourSequence") or []:
        if int(rc.get("ReferencedROINumber", -1)) not in numbers:
            continue
        roi_polys: Dict[int, List[np.ndarray]] = {}
        for c in rc.get("ContourSequence") or []:
            if str(c.get("ContourGeometricType", "CLOSED_PLANAR")).upper() != "CLOSED_PLANAR":
                continue
            pts = _contour_points(c)
            if len(pts) < 3:
                continue
            depth = float(np.mean(pts @ grid.normal))
            k = grid.slice_at(depth)
            if k is None:
                raise BadInput(patient, f.rel, "a contour of ROI %d lies at %.2f mm along the normal, off "
                               "every CT slice (more than half a slice spacing, %.3g mm, from each of the slices "
                               "at %.2f to %.2f mm)"
                               % (int(rc.ReferencedROINumber), depth, grid.dz / 2, grid.depths[0],
                                  grid.depths[-1]))
            refs = c.get("ContourImageSequence") or []
            ref_uid = str(refs[0].get("ReferencedSOPInstanceUID", "")) if refs else ""
            if ref_uid in grid.uid_index and grid.uid_index[ref_uid] != k:
                raise BadInput(patient, f.rel, "a contour of ROI %d lies at %.2f mm along the normal but "
                               "references the slice at %.2f mm" % (int(rc.ReferencedROINumber), depth,
                                                                   grid.depths[grid.uid_index[ref_uid]]))
            roi_polys.setdefault(k, []).append(grid.in_plane(pts, k))
        # XOR within one ROI (holes); union across ROIs
        for k, polys in roi_polys.items():
            per_slice.setdefault(k, []).append(contours.fill_polygons(polys, (grid.rows, grid.cols)))
    for k, fills in per_slice.items():
        for m in fills:
            mask[k] |= m


# --- DICOM-SEG -----------------------------------------------------------------------------------

def _frame_source_uid(fg):
    for d in fg.get("DerivationImageSequence") or []:
        for s in d.get("SourceImageSequence") or []:
            if "ReferencedSOPInstanceUID" in s:
                return str(s.ReferencedSOPInstanceUID)
    return None


def rasterise_seg(f, numbers, grid, patient, mask):
    """OR the segments `numbers` of SEG file `f` on `grid` into bool `mask` (Z, Y, X)."""
    with quiet():
        try:
            ds = pydicom.dcmread(f.path, force=True)
            frames = np.asarray(ds.pixel_array)
        except Exception as e:
            raise BadInput(patient, f.rel, "unreadable DICOM-SEG (%s: %s)" % (type(e).__name__, e))
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames = frames.reshape(n, rows, cols)
    if (rows, cols) != (grid.rows, grid.cols):
        raise BadInput(patient, f.rel, "SEG frames of %dx%d pixels, CT slices of %dx%d: different grids"
                       % (rows, cols, grid.rows, grid.cols))
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        frames = frames >= 0.5 * float(ds.get("MaximumFractionalValue", 255) or 255)
    else:
        frames = frames > 0
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    per = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per) != n:
        raise BadInput(patient, f.rel, "SEG with %d frames but %d per-frame groups" % (n, len(per)))
    iop = find_in_groups((shared,) + tuple(per[:1]), "PlaneOrientationSequence", "ImageOrientationPatient")
    if iop is not None:
        iop = np.array([float(v) for v in iop])
        if np.max(np.abs(iop - np.r_[grid.row_cos, grid.col_cos])) > 1e-3:
            raise BadInput(patient, f.rel, "SEG orientation differs from the CT series: different grids")
    ps = find_in_groups((shared,) + tuple(per[:1]), "PixelMeasuresSequence", "PixelSpacing")
    if ps is not None:
        ps = np.array([float(v) for v in ps])
        if np.max(np.abs(ps - (grid.dy, grid.dx))) > 1e-3 * max(grid.dx, grid.dy):
            raise BadInput(patient, f.rel, "SEG pixel spacing differs from the CT series: different grids")
    for i, fg in enumerate(per):
        groups = (fg, shared)
        number = find_in_groups(groups, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
        if number is None or int(number) not in numbers:
            continue
        k = None
        pos = find_in_groups(groups, "PlanePositionSequence", "ImagePositionPatient")
        if pos is not None:
            pos = np.array([float(v) for v in pos])
            k = grid.slice_at(float(pos @ grid.normal))
            if k is None:
                raise BadInput(patient, f.rel, "SEG frame %d lies at %.2f mm along the normal, off every CT "
                               "slice (more than half a slice spacing, %.3g mm, from each of the slices at %.2f "
                               "to %.2f mm)"
                               % (i + 1, float(pos @ grid.normal), grid.dz / 2, grid.depths[0], grid.depths[-1]))
            else:
                off = grid.in_plane(pos[None], k)[0]
                if np.max(np.abs(off)) > IN_PLANE_TOLERANCE:
                    raise BadInput(patient, f.rel, "SEG frame %d starts %.2f, %.2f pixels off the CT slice "
                                   "origin: different grids" % (i + 1, off[0], off[1]))
        uid = _frame_source_uid(fg)
        if uid in grid.uid_index:
            if k is not None and k != grid.uid_index[uid]:
                raise BadInput(patient, f.rel, "SEG frame %d lies on another slice than the image it "
                               "references" % (i + 1))
            k = grid.uid_index[uid]
        if k is None:
            raise BadInput(patient, f.rel, "SEG frame %d matches no CT slice (by referenced image or "
                           "position)" % (i + 1))
        mask[k] |= frames[i]


def rasterise(files, grid, roi_regex, patient):
    """The tumor mask (uint8 Z, Y, X) of segmentation objects `files` on `grid`, and the kind used."""
    names = {}
    for f in files:
        names.update(roi_names(f))
    rel = files[0].rel if len(files) == 1 else "."
    chosen = select_rois(names, roi_regex, patient, rel)
    mask = np.zeros((len(grid.depths), grid.rows, grid.cols), dtype=bool)
    kinds = []
    for f in files:
        numbers = {num for (r, num) in chosen if r == f.rel}
        if not numbers:
            continue
        kinds.append(f.kind)
        check_frame_of_reference(f, numbers, grid, patient)
        fn = rasterise_rtstruct if f.kind == "rtstruct" else rasterise_seg
        fn(f, numbers, grid, patient, mask)
    if not mask.any():
        used = ", ".join("'%s'" % names[k] for k in chosen)
        raise BadInput(patient, rel if len({r for r, _ in chosen}) != 1 else chosen[0][0],
                       "empty mask: ROI %s has no voxel on the CT grid" % used)
    return mask.view(np.uint8), ("dicom-rtstruct" if kinds[0] == "rtstruct" else "dicom-seg")
