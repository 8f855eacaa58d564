# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are installed first and explicitly: these releases are on the local
# package mirror; the project itself only declares ranges (pyproject.toml).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast bench bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(PY) -m denoiserep demo

test: install
	$(PY) -m pytest -q -n 2

test-fast: install
	$(PY) -m pytest -q -n 2 -m "not slow"

bench: install
	$(PY) -m denoiserep bench

bench-quick: install
	$(PY) -m denoiserep bench --quick

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
