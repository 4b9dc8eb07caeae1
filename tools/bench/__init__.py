"""`make bench`: every stage of the toolkit timed against its ceiling -> bench/results.json, .md and a figure.

The package owns the measurement (no other module times anything for the README); one module per concern:

  cli        the command line (`python3 -m tools.bench --help`), the driver that runs the stages, the JSON
  common     shared helpers: medians of timed runs, the load average, NotAvailable, paths
  machine    the machine facts: CPU, cores, load, BLAS library and core, threads, versions, git commit
  nets       the real Caffe nets measured: FLOPs counted from their blobs, deterministic weights and inputs,
             the train net + solver files, (nets open through tools/caffe_net.py)
  stages     the timed stages: sgemm (the ceiling), train, forward, data, segment
  profile    where the time goes: each layer's forward and backward, the solver's parts (regularisation,
             Adam update, apply), the Python loss, the data layer, and the ceiling of each
  report     derived figures (GFLOP/s, share of the ceiling, peer ratios), the console table, results.md
  figure     bench/profile.png: time per stage against its ceiling
  peer       PEER=torch, Caffe's side: the train net's layers, weights and input exported for the peer;
             merging the peer's timings into the results
  peer_host  PEER=torch, the host's side: PyTorch installed on demand into a cache folder (never a
             dependency of the toolkit), the peer run in a child process, "skipped" without a package index
  peer_torch the peer itself (run by peer_host with PyTorch on its path): the same net, loss and Adam step

This file imports nothing, so that peer_host runs on a host without Caffe or numpy.
"""
