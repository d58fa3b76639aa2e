# The two set-up commands of the README: `make demo` (main job on the embedded default) and `make test`.
# Each creates the virtualenv it needs, installs the requirements and the local Fashion-MNIST files, and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
WORKDIR ?= workdirs/demo

.PHONY: demo test test-fast fashion-mnist venv venv-test clean-demo

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.test: requirements-test.txt requirements-test-nodeps.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -r requirements-test-nodeps.txt
	touch $@

venv: $(VENV)/.runtime
venv-test: $(VENV)/.test

# Debian's dataset-fashion-mnist package holds the IDX files the embedded default trains on.
fashion-mnist:
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  echo "Fashion-MNIST IDX files not found in $(FASHION_MNIST_DIR)."; \
	  echo "Install them with: sudo apt-get install dataset-fashion-mnist"; \
	  echo "or download the four *-ubyte.gz files and run: make demo FASHION_MNIST_DIR=/path/to/them"; exit 1; \
	fi

demo: venv fashion-mnist
	$(PY) main.py --config=configs/demo.py --workdir=$(WORKDIR) --config.input.data_dir=$(FASHION_MNIST_DIR)

test: venv-test fashion-mnist
	$(PY) -m pytest -q --durations=15 tests

# The inner loop: every test not marked slow (no subprocess runs, no multi-process jobs, no whole runs).
test-fast: venv-test fashion-mnist
	$(PY) -m pytest -q --durations=10 -m "not slow" tests

clean-demo:
	rm -rf $(WORKDIR)
