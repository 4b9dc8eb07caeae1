"""Writing a phantom patient as one of the input formats `make data` reads (`write_patient`).

"rtstruct" and "seg": the DICOM CT series plus its RTSTRUCT or DICOM-SEG (data_prep/phantoms/dicom.py),
under nested folders with random hex file names; "nifti": image.nii.gz + mask.nii.gz (or .nii), RAS
affine = LPS->RAS flip of the DICOM one; "nrrd": image.nrrd + mask.nrrd, space left-posterior-superior.
Same bytes for the same (seed, index).
"""
import gzip
import io
import os

import numpy as np

import atomic
from data_prep.phantoms.anatomy import KINDS
from data_prep.phantoms.dicom import ct_datasets, mark_encoded, patient_uids, rtstruct_dataset, seg_dataset

GZIP_LEVEL = 1                   # NIfTI / NRRD: fast compression (noisy HU barely compresses anyway)

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
            mark_encoded(ds)
        pydicom.dcmwrite(os.path.join(folder, rel), ds, write_like_original=False)
        written.append(rel)

    if kind in ("rtstruct", "seg"):
        uids = patient_uids(p)
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
