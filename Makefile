# kdpipe — everything a fresh clone needs. `make demo` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch build to install; override on your machine, e.g. make test TORCH="torch torchvision".
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
LINKS  := $(VENV)/.linked

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

# clip-benchmark is the reference the Recall@K tests compare with: its metrics need only torch and
# tqdm, while its declared dependencies would pull transformers, scikit-learn and pycocoevalcap.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'setuptools>=68' wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=strict
	$(PY) -m pip install -q --no-deps clip-benchmark==1.6.2
	touch $(STAMP)

# The editable install is setuptools' strict mode: build/__editable__.*/kdpipe/ is a tree of links
# to pipeline/ and cli/ named by a plain .pth path, which editors and type checkers follow (the
# default mode's import hook is invisible to them). A new module or package changes a directory's
# mtime and re-links the tree.
$(LINKS): $(STAMP) $(shell find pipeline cli -type d -not -name __pycache__)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	touch $(LINKS)

# lint-imports: the layer contracts in pyproject.toml ([tool.importlinter]; docs/ARCHITECTURE.md).
# --durations: the slowest tests close every run (CI must stay under 20 minutes on 2 cores).
test: $(LINKS)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q --durations=25

test-fast: $(LINKS)
	$(PY) -m pytest -q -m "not slow"

demo: $(LINKS)
	$(VENV)/bin/kdpipe demo --out data/demo

bench: $(LINKS)
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/whiten.py
	$(PY) benchmarks/train.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
