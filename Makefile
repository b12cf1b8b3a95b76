# T2T-ViT: PyTorch training -> ONNX -> INT8 Q/DQ -> strongly typed TensorRT engines -> parity.
# Every variable has a default (?=); override on the command line: make onnx MODEL=t2t_vit_14 CHECKPOINT=...
# Empty variables mean "the registry default" and are not passed on.

PYTHON      ?= .venv/bin/python
MODEL       ?= t2t_vit_12
CHECKPOINT  ?=
IMG_SIZE    ?=
OUT         ?= artifacts/$(MODEL)
DATA        ?=
CONFIG      ?=
EPOCHS      ?=
BATCH_SIZE  ?=
GPUS        ?= 1
NNODES      ?= 1
RUN_DIR     ?= runs/$(MODEL)
PRECISION   ?= fp16
CALIB_DATA  ?=
CALIB_SIZE  ?= 1024
CALIB_METHOD ?= entropy
LIMIT       ?=
LABELS      ?=
BACKENDS    ?=
ARGS        ?=
PYTEST_ARGS ?=

opt = $(if $(strip $(2)),$(1) $(strip $(2)))
STAGE_ARGS = --model $(MODEL) $(call opt,--checkpoint,$(CHECKPOINT)) $(call opt,--img-size,$(IMG_SIZE)) --out $(OUT)

.PHONY: help install test test-fast train validate bench-model bench-train onnx bench-onnx calib bench-calib \
        engine bench parity demo clean

help:
	@grep -E '^## ' Makefile | sed 's/^## //'

## install      create .venv, install the project with test extras, fetch the TensorRT binding wheels (names check)
install:
	python3.11 -m venv .venv
	$(PYTHON) -m pip install -e '.[test]'
	$(PYTHON) -m pip download --no-deps --only-binary=:all: -d .cache/tensorrt-bindings \
		tensorrt-cu12-bindings==10.13.3.9 tensorrt-cu13-bindings==11.4.0.106

## test         run the CPU test suite (TensorRT/GPU tests skip with a reason)
test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)

## test-fast    unit tests only (skips the slow integration tier)
test-fast:
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

## bench-model  SDPA vs explicit attention and fp32 throughput -> reports/bench-model-*.{json,md}
bench-model:
	$(PYTHON) -m t2t_vit.benchmark --out reports $(ARGS)

clean:
	rm -rf artifacts runs .pytest_cache

# ----- train (train/) -----

# ----- export (export/) -----

# ----- calibration (calibration/) -----

# ----- engines (engines/) -----

# ----- parity and demo -----
