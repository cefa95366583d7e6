# `make demo` and `make test` set everything up on a fresh machine and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision are pinned to the wheels this project is tested with; override for other platforms.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: demo test data setup clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "ssql-deploy needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

data:
	@if [ -f $(FASHION_MNIST) ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing; run: sudo apt-get install -y dataset-fashion-mnist"; exit 1; fi

demo: setup data
	$(PY) -m ssql_deploy run recipes/pipelines/quickstart.yaml

# One pytest worker per core; a test file stays on one worker so its module fixtures are built once.
TEST_WORKERS ?= auto

test: setup data
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf runs .pytest_cache
