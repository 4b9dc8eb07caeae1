"""Writers of `make segment`'s outputs: NIfTI (mask, probability), DICOM-SEG, PNG overlays.

Owns the geometry of the outputs. A Scan's arrays are (Z, Y, X) and its affine maps voxel
(col x, row y, slice z) to patient LPS mm (DICOM). NIfTI stores arrays in (x, y, z) order with an
affine to RAS mm, so the array is transposed and the affine's first two rows negated. For NIfTI/NRRD
inputs the output is then reordered onto the input file's own voxel grid (an axis permutation/flip,
whatever the reader did), so that the mask lies voxel for voxel on the input image.

seg.dcm is a standard BINARY DICOM Segmentation (highdicom) with one segment "Tumor", algorithm
type AUTOMATIC, algorithm "TS-FCN", whose frames reference the source CT instances (the Scan's
pixel-free headers). It keeps the source's SpecificCharacterSet, so the patient and study attributes
highdicom copies from the source (names in any script) are encoded as the source encodes them;
without it they would be written as ASCII and a non-ASCII name mangled. Every file is written
atomically (atomic.atomic_path).
"""
import copy
import os
import sys
from typing import Optional, Tuple

import numpy as np

import atomic
from data_prep import dicom_files, readers

SEG_ALGORITHM = "TS-FCN"
SEG_SEGMENT_LABEL = "Tumor"
SEG_SERIES_NUMBER = 901
SEG_SERIES_DESCRIPTION = "TS-FCN tumor segmentation"
SOFTWARE_VERSION = "1.0"
LPS_TO_RAS = readers.RAS_TO_LPS        # the flip of x and y is its own inverse
DISPLAY_WINDOW_HU = (-1350.0, 150.0)   # lung window (level -600, width 1500) for the overlays
OVERLAY_DIR = "overlays"


# --- NIfTI ------------------------------------------------------------------------------------------

def scan_nifti_grid(scan) -> np.ndarray:
    """The Scan's affine for an (x, y, z) array in RAS."""
    return LPS_TO_RAS @ np.asarray(scan.affine, dtype=np.float64)


def reference_grid(scan_path) -> Optional[Tuple[np.ndarray, Tuple[int, int, int], Tuple[int, int]]]:
    """(RAS affine, shape (x, y, z), (qform_code, sform_code)) of a NIfTI/NRRD input file; None for
    DICOM folders."""
    path = str(scan_path)
    if os.path.isdir(path):   # a folder holding image.nii[.gz] / image.nrrd (data_prep.readers.load_scan)
        name = readers.find_volume(path, "image")   # the file load_scan reads there
        if name is None:
            return None
        path = os.path.join(path, name)
    low = path.lower()
    if low.endswith((".nii", ".nii.gz")):
        import nibabel as nib
        img = nib.load(path)
        codes = (int(img.header["qform_code"]) or 1, int(img.header["sform_code"]) or 1)
        return np.asarray(img.affine, np.float64), tuple(int(v) for v in img.shape[:3]), codes
    if low.endswith((".nrrd", ".nhdr")):
        import nrrd
        h = nrrd.read_header(path)
        aff, spatial = readers.nrrd_geometry(h, "scan", os.path.basename(path))    # read before: no BadInput here
        return LPS_TO_RAS @ aff, tuple(int(h["sizes"][a]) for a in spatial), (1, 1)
    return None


def nifti_image(vol_zyx, scan, dtype, reference=None):
    """nibabel image of a (Z, Y, X) volume on the scan's grid (or the reference input file's grid)."""
    import nibabel as nib
    # A (Z, Y, X) C-ordered volume transposed is an F-ordered (x, y, z) view: NIfTI's own byte order,
    # so nibabel writes it without a strided copy (5x faster for a 512 x 512 x 60 volume).
    arr = np.transpose(np.asarray(vol_zyx, dtype=dtype), (2, 1, 0))
    affine = scan_nifti_grid(scan)
    codes = (1, 1)
    if reference is not None:
        ref_affine, ref_shape, codes = reference
        moved = readers.on_grid(arr, affine, ref_affine, ref_shape)
        if moved is None:
            print("segment: warning: the scan's grid differs from the input file's; writing the scan's "
                  "grid", file=sys.stderr)
        else:
            arr, affine = moved, ref_affine
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=codes[0])
    img.set_sform(affine, code=codes[1])
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    return img


def write_nifti(path, vol_zyx, scan, dtype, reference=None):
    import nibabel as nib
    img = nifti_image(vol_zyx, scan, dtype, reference)
    with atomic.atomic_path(path) as tmp:
        nib.save(img, tmp)


# --- DICOM-SEG --------------------------------------------------------------------------------------

# highdicom copies these patient/study attributes from the source; pixel-free headers may lack some.
_TYPE2_DEFAULTS = {"PatientID": "", "PatientName": "", "PatientBirthDate": "", "PatientSex": "",
                   "AccessionNumber": "", "StudyID": "", "StudyDate": "", "StudyTime": "",
                   "ReferringPhysicianName": ""}


def seg_sources(headers):
    """Copies of the source headers with what highdicom reads and pixel-free headers may lack, and
    the SOP class the reader went by where SOPClassUID is blank (de-identified series)."""
    out = []
    for ds in headers:
        ds = copy.copy(ds)
        if not str(ds.get("SOPClassUID", "") or "").strip():
            ds.SOPClassUID = dicom_files.sop_class(ds) or dicom_files.CT_IMAGE
        for key, value in _TYPE2_DEFAULTS.items():
            if key not in ds:
                setattr(ds, key, value)
        out.append(ds)
    return out


def dicom_seg(mask_zyx, scan):
    """highdicom Segmentation of a (Z, Y, X) mask on the scan's DICOM series."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    headers = list(scan.headers or [])
    mask = np.asarray(mask_zyx) != 0
    if len(headers) != mask.shape[0]:
        raise ValueError("DICOM-SEG needs one source header per slice: %d headers, %d slices"
                         % (len(headers), mask.shape[0]))
    algorithm = hd.AlgorithmIdentificationSequence(
        name=SEG_ALGORITHM, family=codes.cid7162.ArtificialIntelligence, version=SOFTWARE_VERSION)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEG_SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=hd.UID(), tracking_id=SEG_SEGMENT_LABEL,
        anatomic_regions=[codes.SCT.Lung])
    seg = hd.seg.Segmentation(
        source_images=seg_sources(headers), pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="TS-FCN toolkit", manufacturer_model_name=SEG_ALGORITHM,
        software_versions=SOFTWARE_VERSION, device_serial_number="1",
        series_description=SEG_SERIES_DESCRIPTION)
    charset = headers[0].get("SpecificCharacterSet") if headers else None
    if charset:
        # the copied values are decoded text: written under the source's character set, they are
        # encoded back as the source had them
        seg.SpecificCharacterSet = charset
    return seg


def write_seg(path, mask_zyx, scan):
    seg = dicom_seg(mask_zyx, scan)
    with atomic.atomic_path(path) as tmp:
        seg.save_as(tmp)


# --- PNG overlays -----------------------------------------------------------------------------------

def view_window(box, shape_yx, margin=0.0):
    """Rows/cols (half-open) of the slice to show: the net's box, clipped to the image."""
    h, w = int(shape_yx[0]), int(shape_yx[1])
    r0 = max(0, int(np.floor(box.top - margin)))
    c0 = max(0, int(np.floor(box.left - margin)))
    r1 = min(h, int(np.ceil(box.top + box.side + margin)))
    c1 = min(w, int(np.ceil(box.left + box.side + margin)))
    return r0, r1, c0, c1


def write_overlays(folder, hu_zyx, mask_zyx, z_range, box):
    """One PNG per segmented slice: the CT (lung window) around the box, the mask's contour in red.
    Returns the file names (relative to `folder`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    z0, z1 = z_range
    r0, r1, c0, c1 = view_window(box, np.shape(hu_zyx)[1:])
    names = []
    width_in = 4.0
    image_h = width_in * (r1 - r0) / float(c1 - c0)
    fig = plt.figure(figsize=(width_in, image_h + 0.3), dpi=100)
    ax = fig.add_axes([0, 0, 1, image_h / (image_h + 0.3)])
    ax.set_axis_off()
    extent = (c0 - 0.5, c1 - 0.5, r1 - 0.5, r0 - 0.5)
    im = ax.imshow(np.zeros((r1 - r0, c1 - c0), np.float32), cmap="gray", vmin=DISPLAY_WINDOW_HU[0],
                   vmax=DISPLAY_WINDOW_HU[1], extent=extent, interpolation="nearest")
    title = fig.text(0.5, 1 - 0.15 / (image_h + 0.3), "", ha="center", va="center", fontsize=9)
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    for z in range(z0, z1):
        im.set_data(np.asarray(hu_zyx[z, r0:r1, c0:c1], np.float32))
        m = np.asarray(mask_zyx[z, r0:r1, c0:c1])
        artists = []
        if m.any() and m.size > 1 and min(m.shape) > 1:
            artists.append(ax.contour(xx, yy, m.astype(np.float32), levels=[0.5], colors="red",
                                      linewidths=1.2))
        title.set_text("slice %d  tumor %d px" % (z, int(np.count_nonzero(mask_zyx[z]))))
        name = "slice_%03d.png" % z
        with atomic.atomic_path(os.path.join(folder, name)) as tmp:
            fig.savefig(tmp, dpi=100, pil_kwargs={"compress_level": 1})  # zlib level 6 took 2/3 of the time
        for cs in artists:
            for coll in cs.collections:
                coll.remove()
        names.append(name)
    plt.close(fig)
    return names


# --- all of them ------------------------------------------------------------------------------------

def write_all(out, scan, prob_zyx, mask_zyx, z_range, box, scan_path=None, png=True):
    """mask.nii.gz, prob.nii.gz, seg.dcm (DICOM scans) and overlays/ in `out`; returns what was written."""
    os.makedirs(out, exist_ok=True)
    reference = reference_grid(scan_path) if scan_path is not None and not scan.headers else None
    written = []
    write_nifti(os.path.join(out, "mask.nii.gz"), mask_zyx, scan, np.uint8, reference)
    written.append("mask.nii.gz")
    write_nifti(os.path.join(out, "prob.nii.gz"), prob_zyx, scan, np.float32, reference)
    written.append("prob.nii.gz")
    if scan.headers:
        write_seg(os.path.join(out, "seg.dcm"), mask_zyx, scan)
        written.append("seg.dcm")
    if png:
        write_overlays(os.path.join(out, OVERLAY_DIR), scan.hu, mask_zyx, z_range, box)
        written.append(OVERLAY_DIR + "/")
    return written
