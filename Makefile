# lmtrain: the verbs a user types. Each bootstraps what it needs: packages, build, data.
#   make train    build, prepare the default corpus once, train configs/tiny.json
#   make test     the whole CPU test suite through ctest (what CI runs)

SHELL := /bin/bash
BUILD ?= build
JOBS ?= $(shell nproc)
CONFIG ?= configs/tiny.json
PYTHON ?= python3

APT_PACKAGES := cmake g++ pkg-config nlohmann-json3-dev libcli11-dev libspdlog-dev catch2 \
                libgloo-dev libopenblas-dev libopenblas-openmp-dev libpcre2-dev
PIP_PACKAGES := numpy tokenizers safetensors
LMTRAIN := $(BUILD)/lmtrain
DATA_STAMP := data/tiny/meta.json

.PHONY: setup build data train test golden info format clean

# Installs only what is missing, so repeated runs cost a second.
setup:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@$(PYTHON) -c "import numpy, tokenizers, safetensors" 2>/dev/null || \
	  $(PYTHON) -m pip install -q $(PIP_PACKAGES)

build: setup
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

$(DATA_STAMP):
	$(PYTHON) scripts/prepare_data.py --corpus default --out data/tiny

data: setup $(DATA_STAMP)

train: build data
	$(LMTRAIN) train --config $(CONFIG) $(ARGS)

test: build data
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# Regenerates the PyTorch golden tensors (needs torch, installed here on demand).
golden:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch numpy safetensors
	$(PYTHON) tests/reference/make_golden.py

info: build
	$(LMTRAIN) info --config $(CONFIG) $(ARGS)

format:
	clang-format -i $$(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')

clean:
	rm -rf $(BUILD)
