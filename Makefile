# TS-FCN toolkit. `make help` lists the targets; README.md explains them.
# Every target runs inside the Caffe runtime (tools/runtime/runtime.sh): natively where `import caffe`
# works (Docker image, own Caffe build), else in the Debian 11 root filesystem that `make env` makes.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON   ?= python3
RUNTIME  := tools/runtime/runtime.sh
# Paths given on the command line that live outside the checkout are bind-mounted into the runtime.
BIND_VARS := RAW DATA RUN SCAN OUT MODEL WEIGHTS SNAPSHOT ROI_FILE PROTOTXT
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

test: runtime ## the test suite, in real Caffe
	$(IN_RUNTIME) $(PYTHON) -m pytest tests $(PYTEST_ARGS)

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

cv: runtime ## [GPUS=0,1,... RUNS=runs/cv]: every fold, then the table of 3D Dice per fold
	$(IN_RUNTIME) $(PYTHON) tools/cv.py --data $(DATA) --folds $(FOLDS) --profile $(PROFILE) \
	  $(if $(GPUS),--gpus $(GPUS)) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(RUNS),--runs $(RUNS)) \
	  $(if $(TRAIN_ARGS),--train-args '$(TRAIN_ARGS)')

ablation: runtime ## the SPEC 7 options (crop 14/11, box patient/slice, loss mean/sum), weights 0.5/0.5: one table
	$(IN_RUNTIME) $(PYTHON) tools/ablation.py --raw $(or $(RAW),runs/demo/raw) --out $(or $(OUT),runs/ablation) \
	  --profile $(or $(filter-out paper,$(PROFILE)),fast) $(gpu_flag) $(if $(TRAIN_ARGS),--train-args '$(TRAIN_ARGS)')

segment: runtime ## SCAN=... BOX=x0,y0,x1,y1 SLICES=z0:z1 (or ROI_FILE=...) MODEL=... OUT=...: tumor mask
	$(IN_RUNTIME) $(PYTHON) tools/segment.py --scan $(SCAN) $(if $(BOX),--box $(BOX)) \
	  $(if $(SLICES),--slices $(SLICES)) $(if $(ROI_FILE),--roi $(ROI_FILE)) --model $(MODEL) \
	  --out $(OUT) $(if $(THRESHOLD),--threshold $(THRESHOLD)) $(if $(PROTOTXT),--prototxt $(PROTOTXT)) \
	  $(if $(BATCH),--batch $(BATCH)) $(gpu_flag)

# --- make fetch (issue 18) ------------------------------------------------------------------------------
# Values reach the tool through the environment, verbatim ($(value …): no make or shell evaluation of
# what they hold). N and SEED are passed only when given (the file defaults above are for phantoms).
.PHONY: fetch
given = $(filter-out undefined default file,$(origin $(1)))
fetch: export FETCH_COHORT = $(value COHORT)
fetch: export FETCH_OUT = $(value OUT)
fetch: export FETCH_N = $(if $(call given,N),$(value N))
fetch: export FETCH_SEED = $(if $(call given,SEED),$(value SEED))
fetch: export FETCH_PATIENTS = $(value PATIENTS)
fetch: export FETCH_ENDPOINT = $(value ENDPOINT)
fetch: export FETCH_PLAN_ONLY = $(value PLAN_ONLY)
fetch: runtime ## COHORT=nsclc-radiomics OUT=dir [N=n [SEED=s] | PATIENTS=id,id PLAN_ONLY=1 ENDPOINT=url]: CT + RTSTRUCT from the IDC
	@[ -n "$$FETCH_COHORT" ] && [ -n "$$FETCH_OUT" ] || { echo "make fetch: give COHORT=… and OUT=dir" >&2; exit 2; }
	@args=(--cohort "$$FETCH_COHORT" --out "$$FETCH_OUT"); \
	[ -z "$$FETCH_N" ] || args+=(--n "$$FETCH_N"); \
	[ -z "$$FETCH_SEED" ] || args+=(--seed "$$FETCH_SEED"); \
	[ -z "$$FETCH_PATIENTS" ] || args+=(--patients "$$FETCH_PATIENTS"); \
	[ -z "$$FETCH_ENDPOINT" ] || args+=(--endpoint-url "$$FETCH_ENDPOINT"); \
	[ -z "$$FETCH_PLAN_ONLY" ] || args+=(--plan-only); \
	$(IN_RUNTIME) $(PYTHON) -m data_prep.fetch "$${args[@]}"

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
