# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv first, with the versions
# in requirements/lock.txt (what the suite passed with; `make lock` refreshes it, see the README).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TUNE  := $(VENV)/bin/tune
STAMP := $(VENV)/.installed
# The CPU build on this kind of machine; GPU users may set TORCH="torch" to get their CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
LOCK  := requirements/lock.txt
LATEST ?= .venv-latest

.PHONY: install test test-slow test-latest lock demo lint clean-demo base judge

$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The fast tier: everything but the tests marked slow.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The slow tier alone (torchrun runs, compiled vs eager, SIGKILL kill-resume, the wheel in a fresh venv);
# `make test PYTEST_ARGS=--runslow` runs both tiers in one go.
test-slow: $(STAMP)
	$(PY) -m pytest -q --runslow -m slow $(PYTEST_ARGS)

# The newest releases pyproject admits, in a throwaway venv, with the default (fast) tests: drift shows up
# here before users meet it. It does not touch .venv or the lock.
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q "$(TORCH)"
	$(LATEST)/bin/python -m pip install -q -e '.[dev]' "$(TORCH)"
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE '^(diffusers|transformers|peft|accelerate|datasets|torch) '
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	rm -rf $(LATEST)

# Re-resolve requirements/lock.txt from pyproject (newest releases); run `make test` before committing it.
lock:
	python3 scripts/lock.py --torch "$(TORCH)" --out $(LOCK)

lint: $(STAMP)
	$(VENV)/bin/ruff check tune recipes tests dashboard scripts bench
	$(VENV)/bin/ruff format --check tune recipes tests dashboard scripts bench

# A LoRA of each example subject (concepts/sks-toy, concepts/w-person; default config), base vs tuned of both
# in compare.png, and the backgrounds suite's subject found / background right per subject (scripts/demo.py).
demo: $(STAMP)
	$(PY) scripts/demo.py

# The default base model from scratch: the toy world's data, then the vae and clip runs (side by side, one
# torch thread each), then the unet run, then models/world-base and models/world-clip in fp16 (see
# models/world-base/MODEL_CARD.md for stage times). A stage whose run finished (DONE) is not run again; an
# interrupted one resumes from its last checkpoint. SHIP_ARGS=--force replaces the models. The unet run's
# evaluation reads its images with the world judge (models/world-judge; `make judge` retrains it).
BASE_RUNS ?= runs
WORLD     ?= data/world-train
SHIP_ARGS ?=

$(WORLD)/metadata.jsonl: | $(STAMP)
	$(TUNE) data world $(WORLD) --count 30000 --split train --seed 0

$(BASE_RUNS)/base-vae/DONE $(BASE_RUNS)/base-clip/DONE &: $(WORLD)/metadata.jsonl
	OMP_NUM_THREADS=1 $(TUNE) run vae --config default data_dir=$(WORLD) output_dir=$(BASE_RUNS)/base-vae resume=latest & \
	vae=$$!; \
	OMP_NUM_THREADS=1 $(TUNE) run clip --config default data_dir=$(WORLD) output_dir=$(BASE_RUNS)/base-clip resume=latest; \
	clip=$$?; wait $$vae && test $$clip -eq 0

$(BASE_RUNS)/base-unet/DONE: $(BASE_RUNS)/base-vae/DONE $(BASE_RUNS)/base-clip/DONE
	$(TUNE) run unet --config default data_dir=$(WORLD) output_dir=$(BASE_RUNS)/base-unet resume=latest \
		vae=$(BASE_RUNS)/base-vae/export/vae clip=$(BASE_RUNS)/base-clip/export/clip

base: $(BASE_RUNS)/base-unet/DONE
	$(PY) scripts/ship_base.py --runs $(BASE_RUNS) $(SHIP_ARGS)

# The world judge every figure is measured with: renders, training, its accuracy (models/world-judge).
judge: $(STAMP)
	$(PY) scripts/train_judge.py
