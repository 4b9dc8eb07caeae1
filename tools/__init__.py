"""The toolkit's tools: `python3 -m tools.<name> --help` (the Makefile's targets run them so).

Two settings every tool wants before Caffe or matplotlib load, unless the environment already says
otherwise: Caffe's per-layer log stays off the console (GLOG_minloglevel=2), and figures are drawn to
files (MPLBACKEND=Agg).
"""
import os

os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("MPLBACKEND", "Agg")
