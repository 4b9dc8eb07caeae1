# TS-FCN toolkit, CPU image: Debian 11 with BVLC Caffe 1.0 (the same install script as `make env`).
#   docker build -t ts-fcn:cpu .          (or: make docker)
#   docker run --rm ts-fcn:cpu            runs `make demo`
#   docker run --rm -v $PWD/runs:/opt/ts-fcn/runs ts-fcn:cpu make train FOLD=0 DATA=...
FROM debian:bullseye-slim

# Optional CA bundle for pip behind a TLS-intercepting proxy (CI passes one; leave empty elsewhere).
ARG PIP_CERT=
COPY tools/runtime/install-deps.sh tools/runtime/requirements.txt tools/runtime/caffe_parallel_math.cpp \
     /opt/ts-fcn-runtime/
RUN if [ -n "$PIP_CERT" ]; then export PIP_CERT; else unset PIP_CERT; fi; \
    sh /opt/ts-fcn-runtime/install-deps.sh

COPY . /opt/ts-fcn
WORKDIR /opt/ts-fcn
ENV PYTHONPATH=/opt/ts-fcn/layers:/opt/ts-fcn MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1 GLOG_minloglevel=1
CMD ["make", "demo"]
