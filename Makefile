# One command sets up a fresh machine and does the job:
#   make test                      # venv + requirements + the whole test suite
#   make test-fast                 # the fast tier (pytest -m 'not slow')
#   make train ARGS="--data_dir D" # venv + requirements + train efficientnet_ex
#   make chain ARGS="--data_dir D" # the original's whole B3 -> B3 -> B0 -> ex method
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast train chain count venv clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# The fast tier (under 3 minutes on a 2-core machine): everything not marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow" $(PYTEST_ARGS)

train: $(STAMP)
	$(PY) train.py --model efficientnet_ex $(ARGS)

chain: $(STAMP)
	$(PY) chain.py $(ARGS)

count: $(STAMP)
	$(PY) torchscope/count.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
