"""A phantom patient as DICOM datasets: the CT series, its RT Structure Set and its DICOM-SEG.

CT Image Storage (int16, RescaleIntercept -1024), an RTSTRUCT with ROI "GTV-1" plus other ROIs, a
DICOM-SEG (highdicom, BINARY, one segment "GTV"); UIDs deterministic per (seed, index).
"""
import numpy as np

from data_prep.phantoms.anatomy import AIR, VERSION, phantom_uid
from data_prep.phantoms.contours import trace_boundaries

RESCALE_INTERCEPT = -1024
GTV_NAME = "GTV-1"               # RTSTRUCT ROI of the tumor
SEG_LABEL = "GTV"                # DICOM-SEG segment of the tumor
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"   # referenced SOP class of the study in RTSTRUCT

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


def patient_uids(p):
    """The UIDs of patient p's study, frame of reference, series and instances (deterministic)."""
    s, i, nz = p["seed"], p["index"], p["hu"].shape[0]

    def u(*parts):
        return phantom_uid(s, i, *parts)
    return {"study": u("study"), "frame": u("frame"), "ct_series": u("ct"), "ct": [u("ct", k) for k in range(nz)],
            "seg_series": u("segs"), "seg": u("seg"), "rt_series": u("rts"), "rt": u("rt")}


def ct_datasets(p, uids=None):
    """The CT series of patient `p` as pydicom Datasets, one per slice, in increasing z."""
    from pydicom.dataset import FileDataset
    uids = uids or patient_uids(p)
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
    uids = uids or patient_uids(p)
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
    uids = uids or patient_uids(p)
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
    dim_uid = phantom_uid(p["seed"], p["index"], "dim")
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


def mark_encoded(ds):
    """Declare `ds` (and nested items) already in explicit VR little endian, so that pydicom writes
    raw elements as they are instead of converting them (no ambiguous VRs are used here)."""
    ds.set_original_encoding(False, True, ds._character_set)
    for elem in ds.values():
        if getattr(elem, "VR", None) == "SQ" and not getattr(elem, "is_raw", False):
            for item in elem.value:
                mark_encoded(item)
