"""The phantom cohort: synthetic chest CT patients, each with one lung tumor, written as real files.

Owns the built-in cohort behind `make phantoms`, `make demo` and the tests, in four modules:

* anatomy.py: `make_patient(seed, index, ...)` builds one patient in memory: a chest-like CT volume in HU (body
  with a fat layer and muscle, two lungs at about -850 HU with texture, heart and mediastinum, the
  descending aorta, trachea, spine and ribs at about 700 HU, lung vessels that look like small round
  nodules in a slice -- the distractors of the report's Fig. 9) and one irregular, lobulated tumor
  (1-6 cm, inside a lung, some touching the chest wall) with its true mask.
* write.py (with dicom.py for the DICOM datasets, contours.py for the RTSTRUCT polygons):
  `write_patient(folder, patient, kind)` writes it as one of the input formats `make data` reads:
  - "rtstruct": a DICOM CT series (CT Image Storage, int16, RescaleIntercept -1024) and an RT
    Structure Set with ROI "GTV-1" plus one or two other ROIs ("Body", "Lung_L", "Lung_R");
  - "seg": the CT series and a DICOM-SEG (highdicom, BINARY, one segment "GTV", frames shuffled);
  - "nifti": `image.nii.gz` + `mask.nii.gz` (or `.nii`), RAS affine = LPS->RAS flip of the DICOM one;
  - "nrrd": `image.nrrd` + `mask.nrrd`, space left-posterior-superior, same geometry as DICOM.
* cohort.py: `write_cohort(out, n, seed, jobs)` writes N patients `PHANTOM_000`, ... under `out` plus the hidden
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

The names below are the API the tools and tests use; `python3 -m data_prep.phantoms` is the CLI (cohort.main).
"""
from data_prep.phantoms.anatomy import (AIR, BONE, DEFAULT_SIZE, HEART, KINDS, LUNG, MUSCLE, TISSUE_NAMES, TUMOR,
                                       TUMOR_MM_RANGE, VESSEL, kind_for_index, make_patient, patient_name)
from data_prep.phantoms.contours import trace_boundaries
from data_prep.phantoms.dicom import (CT_IMAGE_STORAGE, GTV_NAME, RT_STRUCTURE_SET_STORAGE, SEG_LABEL, ct_datasets,
                                     patient_uids, rtstruct_dataset, seg_dataset)
from data_prep.phantoms.cohort import TRUTH_DIR, hu_digest, load_truth, main, truth_path, write_cohort
from data_prep.phantoms.write import write_patient

__all__ = ["AIR", "BONE", "DEFAULT_SIZE", "HEART", "KINDS", "LUNG", "MUSCLE", "TISSUE_NAMES", "TUMOR", "TUMOR_MM_RANGE",
           "VESSEL", "kind_for_index", "make_patient", "patient_name", "trace_boundaries", "CT_IMAGE_STORAGE",
           "GTV_NAME", "RT_STRUCTURE_SET_STORAGE", "SEG_LABEL", "ct_datasets", "patient_uids", "rtstruct_dataset",
           "seg_dataset", "TRUTH_DIR", "hu_digest", "load_truth", "truth_path", "write_cohort", "write_patient", "main"]
