# kdpipe — everything a fresh clone needs. `make demo` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch build to install; override on your machine, e.g. make test TORCH="torch torchvision".
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

# clip-benchmark is the reference the Recall@K tests compare with: its metrics need only torch and
# tqdm, while its declared dependencies would pull transformers, scikit-learn and pycocoevalcap.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps clip-benchmark==1.6.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/kdpipe demo --out data/demo

bench: $(STAMP)
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/whiten.py
	$(PY) benchmarks/train.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
