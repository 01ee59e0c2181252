# Two entry points: `make demo` (the main job) and `make test`. Both create .venv and
# install the pinned dependencies on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# (the grep hides this machine's notes about absent local package mirrors)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $@

demo: install
	$(PY) demo.py

test: install
	WANDB_MODE=disabled $(PY) -m pytest

clean:
	rm -rf $(VENV) .cache outputs multirun runs
