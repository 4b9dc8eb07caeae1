# TS-FCN toolkit. `make help` lists the targets; README.md explains them.
# Every target runs its tool inside the Caffe runtime (tools/runtime/runtime.sh): natively where
# `import caffe` works (Docker image, own Caffe build), else in the Debian 11 root filesystem that
# `make env` makes.
#
# Quoting: every value a target takes (a path, a pattern, a number) reaches the tool verbatim, as one
# argument -- spaces, quotes, $, backticks, unicode -- and is never evaluated by make or by a shell:
#  1. Below, every variable given on the command line is turned into a simply expanded variable that
#     holds exactly the text typed (make would otherwise expand `$|` in ROI='^gtv$|^ctv$', and run
#     `$(shell ...)`), and is exported as that text.
#  2. A recipe never writes $(VAR) bare. An option goes through $(call opt,--name,VAR): one single-
#     quoted shell word '--name=VALUE', or nothing when VAR is empty (the --name=VALUE form keeps
#     values such as BOX=-2,0,9,9 from reading as options). A fixed word goes through $(call q,TEXT).
#     Lists of options (TRAIN_ARGS, PYTEST_ARGS) go through $(call arglist,VAR): split at spaces, each
#     word quoted, never evaluated. CMD (make exec) is a shell command by definition: it is handed to
#     bash -c as one argument.
#  3. Paths that may lie outside the checkout are listed in BIND_VARS: $(IN_RUNTIME) binds them
#     into the root filesystem (a path holding ':' cannot be bound: runtime.sh splits TSFCN_BIND there).
# A new target follows the same pattern, e.g.
#     fetch: runtime ## OUT=dir: ...
#     	$(IN_RUNTIME) $(call q,$(PYTHON)) -m tools.fetch $(call opt,--out,OUT)
# and adds its path variables to BIND_VARS. tests/test_makefile.py checks every target this way.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

# 1. Command-line values, verbatim (simply expanded: their text is never expanded again). Their origin
#    becomes "override": $(call from_cmdline,VAR) says whether VAR was given on the command line.
CMDLINE_VARS := $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v)))
$(foreach v,$(CMDLINE_VARS),$(eval override $(v) := $$(value $(v)))$(eval export $(v)))
from_cmdline = $(filter $(1),$(CMDLINE_VARS))

# 2. Shell words: q = TEXT single-quoted; opt = '--name=VALUE' or nothing; arglist = each word quoted.
q = '$(subst ','\'',$(1))'
opt = $(if $(strip $($(2))),$(call q,$(1)=$($(2))))
arglist = $(foreach w,$($(1)),$(call q,$(w)))

PYTHON   ?= python3
RUNTIME  := tools/runtime/runtime.sh
# 3. Paths given on the command line that live outside the checkout are bind-mounted into the runtime.
BIND_VARS := RAW DATA RUN RUNS SCAN OUT MODEL WEIGHTS SNAPSHOT ROI_FILE PROTOTXT
bind_words = $(foreach v,$(BIND_VARS),$(if $(strip $($(v))),$(call q,$($(v)))))
IN_RUNTIME = TSFCN_BIND="$$(printf '%s:' $(bind_words))" $(call q,$(RUNTIME)) exec
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
PY       = $(call q,$(PYTHON))

# SCHEDULER=slurm on make cv / make ablation: the tool's runs go to Slurm as one job array, submitted from this
# host by tools/slurm.py (Slurm's commands live here, not in the runtime); each task runs the same command
# through the runtime on its node. SLURM_ARGS and SEEDS reach the tools through the environment, verbatim:
# make and the shell never evaluate them. WAIT=1 blocks until the summary is written.
cv ablation: export TSFCN_SLURM_ARGS = $(value SLURM_ARGS)
cv ablation: export TSFCN_SEEDS = $(value SEEDS)
scheduled = $(if $(filter-out slurm,$(SCHEDULER)),$(error SCHEDULER=$(SCHEDULER): the one scheduler is slurm \
  (leave SCHEDULER unset to run here)))$(if $(filter slurm,$(SCHEDULER)),$(if $(GPU)$(GPUS),$(error \
  with SCHEDULER=slurm the GPUs come from Slurm: SLURM_ARGS='--gres=gpu:1' instead of GPU/GPUS))TSFCN_BIND="$$(printf \
  '%s:' $(bind_words))" $(PY) -m tools.slurm submit --slurm-args "$$TSFCN_SLURM_ARGS" $(if $(filter-out \
  0,$(WAIT)),--wait) --,$(IN_RUNTIME) $(PY))

.PHONY: help env runtime exec test demo phantoms data prototxt weights train eval cv ablation recipe segment bench \
        docker docker-test docker-test-gpu caffe-cuda clean

help: ## this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 17

env: runtime ## make the Caffe runtime (Debian 11 + BVLC Caffe 1.0), once; prints the BLAS core and math chosen
	@$(IN_RUNTIME) $(PY) -m tools.runtime.blas_core --report
	@$(IN_RUNTIME) $(PY) -m tools.runtime.parallel_math --report

runtime:
	@$(call q,$(RUNTIME)) ensure

exec: runtime ## run CMD='...' inside the runtime (PYTHONPATH has layers/), e.g. make exec CMD='caffe --version'
	@$(IN_RUNTIME) bash -c $(call q,$(CMD))

test: runtime ## the test suite, in real Caffe (PYTEST_ARGS='tests/test_x.py -x' picks tests); then tests/test_slurm.py on this host, against a local Slurm
	$(IN_RUNTIME) $(PY) -m pytest $(call arglist,PYTEST_ARGS)
	@case "$$TSFCN_PYTEST_ARGS" in ""|*test_slurm*) bash tests/run-on-host.sh "$$TSFCN_PYTEST_ARGS" ;; esac
test: export TSFCN_PYTEST_ARGS = $(value PYTEST_ARGS)

demo: runtime ## phantoms -> data -> train (fast profile) -> eval -> figures, under runs/demo/
	$(IN_RUNTIME) bash tools/demo.sh

phantoms: runtime ## OUT=dir N=20 SEED=0: the built-in phantom cohort (DICOM CT + RTSTRUCT/SEG, NIfTI)
	$(IN_RUNTIME) $(PY) -m data_prep.phantoms $(call q,--out=$(or $(OUT),phantoms)) $(call opt,--n,N) \
	  $(call opt,--seed,SEED) $(call opt,--jobs,JOBS)

data: runtime ## RAW=dir DATA=dir [FOLDS SEED JOBS ROI SKIP_BAD=1 BOX=slice RESIZE=antialias]: cohort -> crops -> HDF5 folds
	$(IN_RUNTIME) $(PY) -m data_prep.make_data $(call opt,--raw,RAW) $(call opt,--data,DATA) \
	  $(call opt,--folds,FOLDS) $(call opt,--seed,SEED) $(call opt,--jobs,JOBS) $(call opt,--roi,ROI) \
	  $(if $(strip $(SKIP_BAD)),--skip-bad) $(call opt,--box,BOX) $(call opt,--hu-window,HU_WINDOW) \
	  $(call opt,--resize,RESIZE)

prototxt: runtime ## regenerate prototxt/{train,val,deploy}.prototxt from prototxt/net.py
	$(IN_RUNTIME) $(PY) -m prototxt.net

weights: runtime ## download the FCN-32s PASCAL (or WEIGHTS_SOURCE=vgg16) caffemodel into weights/
	$(IN_RUNTIME) $(PY) -m tools.weights $(call opt,--source,WEIGHTS_SOURCE)

train: runtime ## FOLD=k [DATA RUN WEIGHTS GPU PROFILE=paper|fast TRAIN_ARGS='--crop aligned ...']: train one fold
	$(IN_RUNTIME) $(PY) -m tools.train $(call opt,--fold,FOLD) $(call opt,--data,DATA) $(call opt,--run,RUN) \
	  $(call opt,--profile,PROFILE) $(call opt,--weights,WEIGHTS) $(call opt,--gpu,GPU) $(call arglist,TRAIN_ARGS)

eval: runtime ## FOLD=k [RUN SNAPSHOT GPU]: caffe test + per-patient 3D Dice + figures
	$(IN_RUNTIME) $(PY) -m tools.evaluate $(call opt,--fold,FOLD) $(call opt,--data,DATA) $(call opt,--run,RUN) \
	  $(call opt,--snapshot,SNAPSHOT) $(call opt,--gpu,GPU)

cv: runtime ## [GPUS=0,1,... RUNS=runs/cv SEEDS=0,1,2 SCHEDULER=slurm SLURM_ARGS='...' WAIT=1]: every fold, then the table
	$(scheduled) -m tools.cv $(call opt,--data,DATA) $(call opt,--folds,FOLDS) $(call opt,--profile,PROFILE) \
	  $(call opt,--gpus,GPUS) $(call opt,--weights,WEIGHTS) $(call opt,--runs,RUNS) $(call opt,--seeds,SEEDS) \
	  $(call opt,--train-args,TRAIN_ARGS)

ablation: runtime ## [RAW OUT TRAIN_ARGS SCHEDULER=slurm SLURM_ARGS WAIT=1] the SPEC 7 options, weights 0.5/0.5: one table
	$(scheduled) -m tools.ablation $(call q,--raw=$(or $(RAW),runs/demo/raw)) \
	  $(call q,--out=$(or $(OUT),runs/ablation)) $(call q,--profile=$(or $(filter-out paper,$(PROFILE)),fast)) \
	  $(call opt,--gpu,GPU) $(call opt,--train-args,TRAIN_ARGS)

recipe: runtime ## [DATA=runs/demo/data OUT=runs/recipe FOLD=0 SEED=0 ONLY='a b']: the fast profile's study -> recipe.md
	$(IN_RUNTIME) $(PY) -m tools.recipe $(call q,--data=$(if $(call from_cmdline,DATA),$(DATA),runs/demo/data)) \
	  $(call q,--out=$(or $(OUT),runs/recipe)) $(call opt,--fold,FOLD) $(call opt,--seed,SEED) \
	  $(if $(strip $(ONLY)),--only $(call arglist,ONLY))

segment: runtime ## SCAN=... BOX=x0,y0,x1,y1 SLICES=z0:z1 (or ROI_FILE=... [ROI=regex]) MODEL=... OUT=...: tumor mask
	$(IN_RUNTIME) $(PY) -m tools.segment $(call opt,--scan,SCAN) $(call opt,--box,BOX) $(call opt,--slices,SLICES) \
	  $(call opt,--roi,ROI_FILE) $(call opt,--roi-regex,ROI) $(call opt,--model,MODEL) $(call opt,--out,OUT) \
	  $(call opt,--threshold,THRESHOLD) $(call opt,--prototxt,PROTOTXT) $(call opt,--batch,BATCH) \
	  $(call opt,--hu-window,HU_WINDOW) $(call opt,--resize,RESIZE) $(call opt,--gpu,GPU)

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

bench: runtime ## [GPU PEER=torch]: every stage and where its time goes -> bench/results.{json,md}, bench/profile.png
	$(if $(filter-out torch,$(PEER)),$(error PEER=$(PEER): the one peer is torch))
	$(IN_RUNTIME) $(PY) -m tools.bench --out bench/results.json $(call opt,--gpu,GPU) $(call opt,--peer,PEER)
	$(if $(strip $(PEER)),$(PY) -m tools.bench.peer_host --results bench/results.json)

docker: ## build the CPU image ts-fcn:cpu (Docker)
	docker build -t ts-fcn:cpu .

docker-test: runtime ## build the image with podman (no Docker engine or registry needed) and run make test in it
	bash tools/runtime/podman-test.sh

docker-test-gpu: runtime ## [BUNDLE=build/ CUDA_ARCH=90]: build the GPU image with podman (CUDA from PyPI; with BUNDLE the bundle of make caffe-cuda, else a compile) and test it without a GPU
	bash tools/runtime/podman-test.sh --gpu $(call opt,--bundle,BUNDLE)

caffe-cuda: runtime ## [CUDA_ARCH=90]: build Caffe with CUDA for current GPUs, as a relocatable bundle
	bash tools/cuda/build-caffe-cuda.sh $(call q,$(or $(CUDA_ARCH),90))

clean: ## remove generated data and runs in the checkout (not the runtime)
	rm -rf data runs phantoms bench/*.tmp
