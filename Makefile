# TS-FCN toolkit. `make help` lists the targets; README.md explains them.
# Every target runs inside the Caffe runtime (tools/runtime/runtime.sh): natively where `import caffe`
# works (Docker image, own Caffe build), else in the Debian 11 root filesystem that `make env` makes.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON   ?= python3
RUNTIME  := tools/runtime/runtime.sh
# Paths given on the command line that live outside the checkout are bind-mounted into the runtime.
BIND_VARS := RAW DATA RUN RUNS SCAN OUT MODEL WEIGHTS SNAPSHOT ROI_FILE PROTOTXT
export TSFCN_BIND := $(subst $(eval) ,:,$(strip $(foreach v,$(BIND_VARS),$(if $($(v)),$(abspath $($(v)))))))
IN_RUNTIME := $(RUNTIME) exec
# GPU=id / GPUS=ids: the runtime swaps in the CUDA build of Caffe (make caffe-cuda).
export TSFCN_GPU := $(strip $(GPU)$(GPUS))

# Defaults (override on the command line).
FOLD     ?= 0
FOLDS    ?= 5
SEED     ?= 0
JOBS     ?= $(shell nproc)
DATA     ?= data
RUN      ?= runs/fold$(FOLD)
PROFILE  ?= paper
N        ?= 20
GPU      ?=
GPUS     ?=

gpu_flag = $(if $(GPU),--gpu $(GPU))

# SCHEDULER=slurm on make cv / make ablation: the tool's runs go to Slurm as one job array, submitted from this
# host by tools/slurm.py (Slurm's commands live here, not in the runtime); each task runs the same command
# through the runtime on its node. SLURM_ARGS and SEEDS reach the tools through the environment, verbatim:
# make and the shell never evaluate them. WAIT=1 blocks until the summary is written.
cv ablation: export TSFCN_SLURM_ARGS = $(value SLURM_ARGS)
cv ablation: export TSFCN_SEEDS = $(value SEEDS)
scheduled = $(if $(filter-out slurm,$(SCHEDULER)),$(error SCHEDULER=$(SCHEDULER): the one scheduler is slurm \
  (leave SCHEDULER unset to run here)))$(if $(filter slurm,$(SCHEDULER)),$(if $(GPU)$(GPUS),$(error \
  with SCHEDULER=slurm the GPUs come from Slurm: SLURM_ARGS='--gres=gpu:1' instead of GPU/GPUS))$(PYTHON) -m \
  tools.slurm submit --slurm-args "$$TSFCN_SLURM_ARGS" $(if $(filter-out 0,$(WAIT)),--wait) --,$(IN_RUNTIME) $(PYTHON))

.PHONY: help env runtime exec test demo phantoms data prototxt weights train eval cv ablation segment bench \
        docker docker-test caffe-cuda clean

help: ## this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

env: runtime ## make the Caffe runtime (Debian 11 + BVLC Caffe 1.0), once; prints the BLAS core chosen
	@$(IN_RUNTIME) $(PYTHON) tools/runtime/blas_core.py --report

runtime:
	@$(RUNTIME) ensure

exec: runtime ## run CMD='...' inside the runtime (PYTHONPATH has layers/), e.g. make exec CMD='caffe --version'
	@$(IN_RUNTIME) bash -c '$(CMD)'

test: runtime ## the test suite, in real Caffe; then tests/test_slurm.py on this host, against a local Slurm
	$(IN_RUNTIME) $(PYTHON) -m pytest tests $(PYTEST_ARGS)
	@case "$$TSFCN_PYTEST_ARGS" in ""|*test_slurm*) bash tests/run-on-host.sh "$$TSFCN_PYTEST_ARGS" ;; esac
test: export TSFCN_PYTEST_ARGS = $(value PYTEST_ARGS)

demo: runtime ## phantoms -> data -> train (fast profile) -> eval -> figures, under runs/demo/
	$(IN_RUNTIME) bash tools/demo.sh

phantoms: runtime ## OUT=dir N=20 SEED=0: the built-in phantom cohort (DICOM CT + RTSTRUCT/SEG, NIfTI)
	$(IN_RUNTIME) $(PYTHON) -m data_prep.phantoms --out $(or $(OUT),phantoms) --n $(N) --seed $(SEED) --jobs $(JOBS)

data: runtime ## RAW=dir DATA=dir [FOLDS SEED JOBS ROI SKIP_BAD=1 BOX=slice]: cohort -> crops -> HDF5 folds
	$(IN_RUNTIME) $(PYTHON) -m data_prep.make_data --raw $(RAW) --data $(DATA) --folds $(FOLDS) \
	  --seed $(SEED) --jobs $(JOBS) $(if $(ROI),--roi '$(ROI)') $(if $(SKIP_BAD),--skip-bad) \
	  $(if $(BOX),--box $(BOX)) $(if $(HU_WINDOW),--hu-window=$(HU_WINDOW))

prototxt: runtime ## regenerate prototxt/{train,val,deploy}.prototxt from prototxt/net.py
	$(IN_RUNTIME) $(PYTHON) prototxt/net.py

weights: runtime ## download the FCN-32s PASCAL (or WEIGHTS_SOURCE=vgg16) caffemodel into weights/
	$(IN_RUNTIME) $(PYTHON) tools/weights.py $(if $(WEIGHTS_SOURCE),--source $(WEIGHTS_SOURCE))

train: runtime ## FOLD=k [DATA RUN WEIGHTS GPU PROFILE=paper|fast TRAIN_ARGS='--crop aligned ...']: train one fold
	$(IN_RUNTIME) $(PYTHON) tools/train.py --fold $(FOLD) --data $(DATA) --run $(RUN) \
	  --profile $(PROFILE) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(gpu_flag) $(TRAIN_ARGS)

eval: runtime ## FOLD=k [RUN SNAPSHOT GPU]: caffe test + per-patient 3D Dice + figures
	$(IN_RUNTIME) $(PYTHON) tools/evaluate.py --fold $(FOLD) --data $(DATA) --run $(RUN) \
	  $(if $(SNAPSHOT),--snapshot $(SNAPSHOT)) $(gpu_flag)

cv: runtime ## [GPUS=0,1,... RUNS=runs/cv SEEDS=0,1,2 SCHEDULER=slurm SLURM_ARGS='...' WAIT=1]: every fold, then the table
	$(scheduled) tools/cv.py --data $(DATA) --folds $(FOLDS) --profile $(PROFILE) \
	  $(if $(GPUS),--gpus $(GPUS)) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(RUNS),--runs $(RUNS)) \
	  $(if $(SEEDS),--seeds "$$TSFCN_SEEDS") $(if $(TRAIN_ARGS),--train-args '$(TRAIN_ARGS)')

ablation: runtime ## [RAW OUT TRAIN_ARGS SCHEDULER=slurm SLURM_ARGS WAIT=1] the SPEC 7 options, weights 0.5/0.5: one table
	$(scheduled) tools/ablation.py --raw $(or $(RAW),runs/demo/raw) --out $(or $(OUT),runs/ablation) \
	  --profile $(or $(filter-out paper,$(PROFILE)),fast) $(gpu_flag) $(if $(TRAIN_ARGS),--train-args '$(TRAIN_ARGS)')

segment: runtime ## SCAN=... BOX=x0,y0,x1,y1 SLICES=z0:z1 (or ROI_FILE=...) MODEL=... OUT=...: tumor mask
	$(IN_RUNTIME) $(PYTHON) tools/segment.py --scan $(SCAN) $(if $(BOX),--box $(BOX)) \
	  $(if $(SLICES),--slices $(SLICES)) $(if $(ROI_FILE),--roi $(ROI_FILE)) --model $(MODEL) \
	  --out $(OUT) $(if $(THRESHOLD),--threshold $(THRESHOLD)) $(if $(PROTOTXT),--prototxt $(PROTOTXT)) \
	  $(if $(BATCH),--batch $(BATCH)) $(gpu_flag)

bench: runtime ## measure every stage -> bench/results.json and a table
	$(IN_RUNTIME) $(PYTHON) tools/bench.py --out bench/results.json $(gpu_flag)

docker: ## build the CPU image ts-fcn:cpu (Docker)
	docker build -t ts-fcn:cpu .

docker-test: runtime ## build the image with podman (no Docker engine or registry needed) and run make test in it
	bash tools/runtime/podman-test.sh

caffe-cuda: runtime ## [CUDA_ARCH=90]: build Caffe with CUDA for current GPUs, as a relocatable bundle
	bash tools/cuda/build-caffe-cuda.sh $(or $(CUDA_ARCH),90)

clean: ## remove generated data and runs in the checkout (not the runtime)
	rm -rf data runs phantoms bench/*.tmp
