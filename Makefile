# The verbs users type. Every target sets up what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/curriculum
DATA   ?= data/synthetic
RUNS   ?= runs
STAMP  := $(VENV)/.installed

.PHONY: help setup test test-faults smoke demo data pretrain finetune curriculum compare bench gpu-wheels clean

help:
	@echo "make demo      generate the synthetic set, pretrain, fine-tune, evaluate (CPU, < 20 min)"
	@echo "make test      unit and integration tests (fast)"
	@echo "make test-faults  slow fault-injection tests (DDP, kills, resume)"
	@echo "make smoke     tiny shards, both stages, 2-process DDP"
	@echo "make pretrain / make finetune   stage 1 / stage 2 with RECIPE_ARGS overrides (runs in RUNS=runs)"
	@echo "make curriculum   both stages in one run (recipes/curriculum.yaml)"
	@echo "make data      the synthetic train/val shards (DATA=data/synthetic)"
	@echo "make setup     the virtual environment (.venv); every target makes it when missing"
	@echo "make clean     remove RUNS and data"
	@echo "make compare   baseline vs curriculum report"
	@echo "make bench     training-step and data-pipeline benchmarks"
	@echo "make gpu-wheels   wheels that benchmarks/gpu_session.sh needs on a GPU machine without them"

# torch and torchvision first, pinned to the tested pair: an unpinned resolve may pull other multi-GB builds.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-faults: $(STAMP)
	$(PY) -m pytest -q -m slow tests

$(DATA)/train/index.json: | $(STAMP)
	$(PY) -m data_prep.synthetic --out $(DATA)/train --frames 480 --seed 0 --width 420 --height 140
$(DATA)/val/index.json: | $(STAMP)
	$(PY) -m data_prep.synthetic --out $(DATA)/val --frames 64 --seed 1000000 --width 420 --height 140

data: $(DATA)/train/index.json $(DATA)/val/index.json

# The recipes train on data/synthetic; DATA=... points the targets below at another generated set.
DATA_ARGS := 'data.train_shards=$(DATA)/train/*.tar' 'data.val_shards=$(DATA)/val/*.tar'

smoke: $(STAMP)
	$(PY) -m curriculum.smoke --out $(RUNS)/smoke

# Demo budget: about 9 minutes of training on 2 CPU cores (tiny model, ~2.3 steps/s).
DEMO_PRETRAIN_STEPS ?= 800
DEMO_FINETUNE_STEPS ?= 400
DEMO := $(RUNS)/demo

demo: data
	$(CLI) train recipes/pretrain.yaml recipes/demo.yaml $(DATA_ARGS) run.name=demo-pretrain run.out_dir=$(DEMO)/pretrain run.overwrite=true \
		logging.group=demo stages.0.steps=$(DEMO_PRETRAIN_STEPS)
	$(CLI) train recipes/finetune.yaml recipes/demo.yaml $(DATA_ARGS) run.name=demo-finetune run.out_dir=$(DEMO)/finetune run.overwrite=true \
		logging.group=demo stages.0.steps=$(DEMO_FINETUNE_STEPS) init_from=$(DEMO)/pretrain/checkpoints/last.ckpt
	$(CLI) eval --checkpoint $(DEMO)/pretrain/checkpoints/last.ckpt --shards '$(DATA)/val/*.tar' \
		--protocol synthetic --out $(DEMO)/eval-pretrain.json
	$(CLI) eval --checkpoint $(DEMO)/finetune/checkpoints/last.ckpt --shards '$(DATA)/val/*.tar' \
		--protocol synthetic --out $(DEMO)/eval-finetune.json
	@echo
	@echo "demo results in $(DEMO):"
	@echo "  eval-finetune.json / eval-pretrain.json   metrics per range, sky, phantom rate"
	@echo "  eval-*.png, eval-*_examples.png           the same as bar charts, and depth panels"
	@echo "  */checkpoints/last.ckpt                   checkpoints (with recipe and stage metadata)"
	@echo "  */panels/*.png                            rgb | ground truth | prediction | error panels"
	@echo "  */metrics.csv, */wandb/                   training curves (W&B offline unless an API key is set)"

# Stage 1 then stage 2 on the synthetic set (or any shards: RECIPE_ARGS='data.train_shards=...'),
# each run in $(RUNS)/<target>, where finetune's INIT looks for stage 1.
INIT ?= $(RUNS)/pretrain/checkpoints/last.ckpt

pretrain: data
	$(CLI) train recipes/pretrain.yaml $(DATA_ARGS) run.out_dir=$(RUNS)/pretrain $(RECIPE_ARGS)

finetune: data
	$(CLI) train recipes/finetune.yaml init_from=$(INIT) $(DATA_ARGS) run.out_dir=$(RUNS)/finetune $(RECIPE_ARGS)

curriculum: data
	$(CLI) train recipes/curriculum.yaml $(DATA_ARGS) run.out_dir=$(RUNS)/curriculum $(RECIPE_ARGS)

compare: data
	$(CLI) compare recipes/compare.yaml 'train.data.train_shards=$(DATA)/train/*.tar' \
		'train.data.val_shards=$(DATA)/val/*.tar' $(RECIPE_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/data_pipeline.py

# What benchmarks/gpu_session.sh needs on a GPU machine whose image lacks it (Python 3.12, x86-64,
# no network there): wheels of this environment's versions in .whl/, carried along with the call.
GPU_WHEELS := webdataset braceexpand omegaconf imagecodecs
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	for name in $(GPU_WHEELS); do \
		version=$$($(PY) -m pip show $$name | sed -n 's/^Version: //p'); \
		$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
			--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
			-d .whl "$$name==$$version" || exit 1; \
	done
	ls .whl

clean:
	rm -rf $(RUNS) data
