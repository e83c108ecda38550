# The verbs users type. Every target sets up what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/curriculum
DATA   ?= data/synthetic
RUNS   ?= runs
STAMP  := $(VENV)/.installed

.PHONY: help setup test test-faults smoke demo data pretrain finetune curriculum compare bench clean

help:
	@echo "make demo      generate the synthetic set, pretrain, fine-tune, evaluate (CPU, < 20 min)"
	@echo "make test      unit and integration tests (fast)"
	@echo "make test-faults  slow fault-injection tests (DDP, kills, resume)"
	@echo "make smoke     tiny shards, both stages, 2-process DDP"
	@echo "make pretrain / make finetune   stage 1 / stage 2 with RECIPE_ARGS overrides"
	@echo "make compare   baseline vs curriculum report"
	@echo "make bench     training-step and data-pipeline benchmarks"

# torch and torchvision first, pinned: an unpinned resolve may pull multi-GB builds.
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

smoke: $(STAMP)
	$(PY) -m curriculum.smoke --out $(RUNS)/smoke

demo: data
	$(CLI) train recipes/pretrain.yaml recipes/demo.yaml run.out_dir=$(RUNS)/demo/pretrain
	$(CLI) train recipes/finetune.yaml recipes/demo.yaml run.out_dir=$(RUNS)/demo/finetune \
		init_from=$(RUNS)/demo/pretrain/checkpoints/last.ckpt
	$(CLI) eval --checkpoint $(RUNS)/demo/finetune/checkpoints/last.ckpt \
		--shards '$(DATA)/val/*.tar' --protocol synthetic --out $(RUNS)/demo/eval.json
	@echo "demo results: $(RUNS)/demo (eval.json, checkpoints, wandb offline logs)"

pretrain: data
	$(CLI) train recipes/pretrain.yaml $(RECIPE_ARGS)

finetune: $(STAMP)
	$(CLI) train recipes/finetune.yaml $(RECIPE_ARGS)

curriculum: data
	$(CLI) train recipes/curriculum.yaml $(RECIPE_ARGS)

compare: data
	$(CLI) compare recipes/compare.yaml $(RECIPE_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/data_pipeline.py

clean:
	rm -rf $(RUNS) data
