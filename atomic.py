"""Never a half-written output: write to a temporary name beside the target, then rename.

`atomic_path(path)` yields a temporary path in the same folder; on success it is renamed over `path`
(os.replace is atomic on POSIX), on any exception it is removed. Every tool that writes a file the
next stage reads (HDF5, JSON, caffemodels, NIfTI, DICOM, figures) goes through it.
"""
import contextlib
import json
import os


@contextlib.contextmanager
def atomic_path(path):
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    if base.endswith(".nii"):  # keep double extensions such as .nii.gz recognisable by writers
        base, ext = base[:-4], ".nii" + ext
    tmp = os.path.join(folder, ".%s.tmp%d%s" % (base, os.getpid(), ext))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")
