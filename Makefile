# lmtrain: the verbs a user types. Each bootstraps what it needs: packages, build, data.
#   make train    build, prepare the default corpus once, train configs/tiny.json
#   make test     the whole CPU test suite through ctest (what CI runs)
#   make test-gpu the CUDA backend against the CPU on a GPU, then a memcheck of one training step
#   make bundle   build/ and data/tiny/ with the libraries they need, for a GPU machine that cannot
#                 install packages (unpack in a checkout of the same commit; scripts/gpu_check.sh)
#   make bench    lmtrain vs the PyTorch reference on a GPU (ARGS=--quick: d12 only); uses the
#                 lmtrain already built in $(BUILD), installs and builds nothing

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

# make ddp-train: pretraining on every GPU of this machine (1 rank on a CPU machine).
NGPUS ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); [ "$$n" -gt 0 ] && echo $$n || echo 1)
DEPTH ?= 12
TARGET_FLOPS ?= 1e18
RUN ?= d$(DEPTH)
DDP_CONFIG := $(if $(filter command line,$(origin CONFIG)),$(CONFIG),configs/pretrain.json)

.PHONY: setup cudnn-frontend build data train test test-gpu golden info format clean bench bundle ddp-train

# cuDNN's frontend (header-only C++ API over the cuDNN library that ships with the CUDA toolkit):
# not a Debian package; the PyPI wheel nvidia-cudnn-frontend carries the headers, unpacked into
# the git-ignored $(CUDNN_FE_DIR)/include. CMake finds them there; without them (or without
# cuDNN, or nvcc) the build uses our own attention kernel only (docs/CUDA.md).
CUDNN_FE_VERSION := 1.32.0
CUDNN_FE_DIR := third_party/cudnn_frontend
CUDNN_FE_STAMP := $(CUDNN_FE_DIR)/include/.version-$(CUDNN_FE_VERSION)

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
	@if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then \
	  $(MAKE) --no-print-directory cudnn-frontend; fi

# Idempotent: does nothing once the stamp of this version exists. A failed download is only a
# warning (the build then falls back to our own attention kernel).
cudnn-frontend:
	@if [ ! -f $(CUDNN_FE_STAMP) ]; then \
	  echo "fetching the cuDNN frontend headers $(CUDNN_FE_VERSION) into $(CUDNN_FE_DIR)/include"; \
	  tmp=$$(mktemp -d) && \
	  $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
	    --platform manylinux_2_28_x86_64 -d $$tmp nvidia-cudnn-frontend==$(CUDNN_FE_VERSION) && \
	  rm -rf $(CUDNN_FE_DIR)/include && mkdir -p $(CUDNN_FE_DIR) && \
	  $(PYTHON) -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
	    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('include/')])" \
	    $$tmp/nvidia_cudnn_frontend-*.whl $(CUDNN_FE_DIR) && \
	  test -f $(CUDNN_FE_DIR)/include/cudnn_frontend.h && touch $(CUDNN_FE_STAMP) || \
	  echo "warning: could not fetch the cuDNN frontend headers: bf16 attention uses the own kernel" >&2; \
	  rm -rf $$tmp; \
	fi

build: setup
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

# The script rebuilds what an older version of it made (its recipe names the version) and
# otherwise only checks; touching the stamp keeps make from asking again.
$(DATA_STAMP): scripts/prepare_data.py
	$(PYTHON) scripts/prepare_data.py --corpus default --out data/tiny
	@touch $@

data: setup $(DATA_STAMP)

train: build data
	$(LMTRAIN) train --config $(CONFIG) $(ARGS)

# Iterations follow from the FLOPs budget: round(TARGET_FLOPS / (flops_per_token * batch)).
ddp-train: build data
	$(LMTRAIN) launch --nproc-per-node $(NGPUS) -- $(abspath $(LMTRAIN)) train --config $(DDP_CONFIG) \
	  --set model.depth=$(DEPTH) --set schedule.num_iterations=-1 \
	  --set schedule.target_param_data_ratio=-1 --set schedule.target_flops=$(TARGET_FLOPS) \
	  --set run.name=$(RUN) \
	  $(if $(TOTAL_BATCH),--set batch.total_batch_tokens=$(TOTAL_BATCH)) \
	  $(if $(DEVICE_BATCH),--set batch.device_batch=$(DEVICE_BATCH)) $(ARGS)

test: build data
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# The CUDA backend against the CPU reference, on a machine with a GPU (docs/CUDA.md): every op,
# the whole model and 10 training steps per optimizer preset, then compute-sanitizer's memcheck
# over one training step of configs/tiny.json when compute-sanitizer is installed. ARGS: Catch2's
# arguments for the first part, e.g. ARGS='[attention] -s'. scripts/gpu_check.sh has more steps.
test-gpu: build data
	scripts/gpu_check.sh --build $(BUILD) tests memcheck --test-args $(ARGS)

# build/'s programs, the libraries they need that are neither the C/C++ runtime nor CUDA's, and
# data/tiny/, in one tarball for a GPU machine that cannot install packages (scripts/bundle.sh).
BUNDLE ?= dist/lmtrain-bundle.tar.xz
bundle: build data
	scripts/bundle.sh $(BUILD) $(BUNDLE)

# Regenerates the PyTorch golden tensors (needs torch, installed here on demand).
golden:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch numpy safetensors
	$(PYTHON) tests/reference/make_golden.py
	$(PYTHON) tests/reference/make_golden_normuon.py

info: build
	$(LMTRAIN) info --config $(CONFIG) $(ARGS)

# Throughput against scripts/bench/torch_gpt.py (see docs/BENCHMARKS.md). Deliberately not
# behind `build`: it runs where apt-get cannot, with a prebuilt $(LMTRAIN) and data/tiny carried in.
bench:
	@test -x $(LMTRAIN) || { echo "make bench: $(LMTRAIN) is missing: run 'make build' first, or bring a prebuilt $(BUILD)/ directory (make bench builds nothing)" >&2; exit 1; }
	@test -f $(DATA_STAMP) || { echo "make bench: data/tiny is missing: run 'make data' first, or bring data/tiny along" >&2; exit 1; }
	$(PYTHON) scripts/bench/run.py --lmtrain $(LMTRAIN) $(ARGS)

format:
	clang-format -i $$(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')

clean:
	rm -rf $(BUILD)
