"""LSUV (tools/lsuv.py) on a real Caffe TS-FCN train net: every learned layer ends at unit std."""
import os

import numpy as np

import caffe
from prototxt import net as net_module
import tiny_data
from tools import caffe_net, lsuv


def test_every_learned_layer_ends_at_unit_std(tmp_path):
    data = tiny_data.make(str(tmp_path / "data"), patients=2, slices=2, folds=2)
    proto = tmp_path / "train.prototxt"
    proto.write_text(str(net_module.ts_fcn("train", fc_channels=32)))
    cwd = os.getcwd()
    os.chdir(os.path.join(data, "fold0"))
    try:
        caffe_net.use_device()
        caffe.set_random_seed(0)
        net = caffe.Net(str(proto), caffe.TRAIN)
        upscore = net.params["upscore"][0].data.copy()
        before = lsuv.unit_variance(net, batches=2)
        # The FCN input scale (+-50) makes conv1_1's MSRA output far from unit variance.
        assert before["conv1_1"] > 5
        for name in lsuv.LAYERS:
            assert abs(lsuv.layer_std(net, name, batches=2) - 1.0) < 0.35, name
            assert not net.params[name][1].data.any()
        # The fixed bilinear upsampling is not touched.
        np.testing.assert_array_equal(net.params["upscore"][0].data, upscore)
    finally:
        os.chdir(cwd)
