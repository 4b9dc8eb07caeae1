"""Shared by tests/test_segment*.py (their fixtures are in tests/conftest.py): a small phantom patient,
a caffemodel of the real deploy net as its fillers make it, and the one-line CLI error check.

tests/conftest.py imports this module, so it imports the toolkit only inside its functions
(tests/test_slurm.py runs on the host, outside the runtime)."""
PHANTOM_SIZE = 128


def make_phantom(folder):
    """A small phantom patient (DICOM CT + RTSTRUCT) written to `folder`: (patient dict, folder)."""
    from data_prep import phantoms
    p = phantoms.make_patient(0, 1, "rtstruct", n_slices=12, size=PHANTOM_SIZE, tumor_mm=40)
    phantoms.write_patient(folder, p, "rtstruct")
    return p, folder


def make_filler_model(path):
    """A caffemodel of the real deploy net, as its fillers make it (untrained, real Caffe), at `path`."""
    import caffe
    from tools import caffe_net, segment as seg
    caffe_net.use_device()
    caffe.set_random_seed(0)
    caffe.Net(seg.DEFAULT_PROTOTXT, caffe.TEST).save(path)
    return path


def cli_error(argv, capsys):
    """segment's main on argv must fail with status 2 and exactly one 'segment: error: ' line; that line."""
    from tools import segment as seg
    rc = seg.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("segment: error: "), err
    return err[0]
