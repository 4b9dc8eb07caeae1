"""Scan: one CT volume in Hounsfield units, its voxel geometry and (optionally) its tumor mask.

Every reader (data_prep.readers) returns a Scan whatever the input format, so the later stages
(cropping, segmentation output) never see DICOM, NIfTI or NRRD details.

Conventions
- Arrays are (Z, Y, X) = (slice, row, column). Slices are sorted along the slice normal (ascending
  ImagePositionPatient . normal); rows and columns keep the stored pixel order of the DICOM
  slices, so row 0 / column 0 is the first stored pixel (for an axial DICOM series: anterior /
  patient right). NIfTI and NRRD volumes are re-indexed (flips and axis swaps only, never
  interpolation) into the same display order: column -> patient left, row -> posterior,
  slice -> superior.
- `affine` maps a voxel index (column x, row y, slice z, 1) to patient LPS millimetres, the DICOM
  convention (note: NIfTI files store RAS; the readers convert).
- `spacing` is (dz, dy, dx) in mm: distance between slice planes, between rows, between columns.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np


@dataclass
class Scan:
    hu: np.ndarray            # float32 (Z, Y, X) Hounsfield units; slices sorted along the slice normal
    mask: Optional[np.ndarray]  # uint8 (Z, Y, X) in {0,1}, or None (image only)
    spacing: Tuple[float, float, float]   # (dz, dy, dx) mm
    affine: np.ndarray        # 4x4, voxel index (col x, row y, slice z, 1) -> patient LPS mm (DICOM convention)
    source_kind: str          # 'dicom-rtstruct' | 'dicom-seg' | 'dicom' | 'nifti' | 'nrrd'
    slice_uids: Optional[List[str]] = None    # SOPInstanceUID of each sorted slice (DICOM sources)
    headers: Optional[list] = None  # sorted pydicom Datasets without PixelData (DICOM), for writing DICOM-SEG
