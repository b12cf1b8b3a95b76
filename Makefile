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
REQUIRE     ?=
ARGS        ?=
PYTEST_ARGS ?=

opt = $(if $(strip $(2)),$(1) $(strip $(2)))
WEIGHTS     ?=
ENGINE_ARGS = --model $(MODEL) $(call opt,--checkpoint,$(CHECKPOINT)) $(call opt,--img-size,$(IMG_SIZE)) --out $(OUT)
STAGE_ARGS  = $(ENGINE_ARGS) $(call opt,--weights,$(WEIGHTS))
# Images per batch of the stages that batch images (BATCH_SIZE >= 1; empty = each stage's default).
RUN_ARGS    = $(call opt,--batch-size,$(BATCH_SIZE))

.PHONY: help install test test-fast train validate onnx calib engine bench parity demo clean

# $(VAR) in a help line is shown with its value (REPORT_DIR=... changes where the reports go).
help:
	@grep -E '^## ' Makefile | sed -e 's/^## //' -e 's|$$(REPORT_DIR)|$(REPORT_DIR)|g'

## install      create .venv, install the project with test extras, fetch the TensorRT binding wheels (names check)
install:
	python3.11 -m venv .venv
	$(PYTHON) -m pip install -e '.[test,serve]'
	$(MAKE) install-serve
	$(PYTHON) -m pip download --no-deps --only-binary=:all: -d .cache/tensorrt-bindings \
		tensorrt-cu12-bindings==10.13.3.9 tensorrt-cu13-bindings==11.4.0.106

## test         run the CPU test suite (TensorRT/GPU tests skip with a reason)
test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)

## test-fast    unit tests only (skips the slow integration tier)
test-fast:
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

## clean        remove artifacts/, runs/ and .pytest_cache (trained checkpoints in runs/ too; reports/ stays)
clean:
	rm -rf artifacts runs .pytest_cache

# ----- train (train/) -----
# GPUS>1 (or NNODES>1) launches torchrun; multi-node also needs NODE_RANK and MASTER_ADDR on every node.
NODE_RANK   ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
TRAIN_LAUNCH = $(if $(filter-out 1,$(GPUS) $(NNODES)),$(PYTHON) -m torch.distributed.run --nproc_per_node=$(GPUS) \
	$(if $(filter-out 1,$(NNODES)),--nnodes=$(NNODES) --node_rank=$(NODE_RANK) --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT),--standalone),$(PYTHON))
TRAIN_ARGS = --model $(MODEL) $(call opt,--data,$(DATA)) $(call opt,--config,$(CONFIG)) $(call opt,--epochs,$(EPOCHS)) \
	$(call opt,--batch-size,$(BATCH_SIZE)) $(call opt,--img-size,$(IMG_SIZE)) --out $(RUN_DIR)

## train        train MODEL on DATA (DATA/train, DATA/val) with train/configs/MODEL.yaml [GPUS=8 EPOCHS= BATCH_SIZE= IMG_SIZE= CONFIG= ARGS=]
train:
	$(TRAIN_LAUNCH) -m train.train $(TRAIN_ARGS) $(ARGS)

.PHONY: train-imagenette-cpu
REF_RUN     ?= runs/imagenette-t2t_vit_7
REF_DATA    ?= $(or $(DATA),../shared/data/imagenette2)
## train-imagenette-cpu  the reference checkpoint: t2t_vit_7 from scratch on Imagenette at 80 px on a 2-core CPU; resumes an interrupted run -> runs/imagenette-t2t_vit_7/ + reports/train-imagenette-cpu.{json,md,png}
train-imagenette-cpu:
	$(PYTHON) -m train.train $(if $(wildcard $(REF_RUN)/last.pth),--resume $(REF_RUN)/last.pth,\
		--config train/configs/imagenette_cpu.yaml --data $(REF_DATA) --out $(REF_RUN)) $(ARGS)
	$(PYTHON) -m train.validate --model t2t_vit_7 --checkpoint $(REF_RUN)/best.pth --data $(REF_DATA)/val --out $(REF_RUN)
	$(PYTHON) -m train.report --run $(REF_RUN) --checkpoint $(REF_RUN)/best.pth \
		--validate $(REF_RUN)/validate-imagenette2-val.json --name train-imagenette-cpu --command "make train-imagenette-cpu"

# ----- 224 px evidence (issue 20): the 224 px reference checkpoint, the resolution sweep, the GPU check -----
.PHONY: train-imagenette-224 precision-sweep precision-evidence gpu-pack gpu-check
REF224_RUN  ?= runs/imagenette-t2t_vit_7-224
FINETUNE    ?= $(REF_RUN)/best.pth
SWEEP       ?= 80,160,224,384
GPU_CHECKPOINT ?= $(REF224_RUN)/best.pth
## train-imagenette-224  the 224 px reference checkpoint: FINETUNE (default the 80 px reference's best.pth) fine-tuned at 224 px on Imagenette on a 2-core CPU; resumes an interrupted run -> runs/imagenette-t2t_vit_7-224/ + reports/train-imagenette-224.{json,md,png}
train-imagenette-224:
	@test -f $(REF224_RUN)/last.pth || test -f "$(FINETUNE)" || { echo "train-imagenette-224: error: FINETUNE=$(FINETUNE)" \
		"does not exist; run make train-imagenette-cpu first, or pass FINETUNE=/path/to/80px/best.pth"; exit 2; }
	$(PYTHON) -m train.train $(if $(wildcard $(REF224_RUN)/last.pth),--resume $(REF224_RUN)/last.pth,\
		--config train/configs/imagenette_224.yaml --finetune $(FINETUNE) --data $(REF_DATA) --out $(REF224_RUN)) $(ARGS)
	$(PYTHON) -m train.validate --model t2t_vit_7 --checkpoint $(REF224_RUN)/best.pth --data $(REF_DATA)/val --out $(REF224_RUN)
	$(PYTHON) -m train.report --run $(REF224_RUN) --checkpoint $(REF224_RUN)/best.pth \
		--validate $(REF224_RUN)/validate-imagenette2-val.json --name train-imagenette-224 --command "make train-imagenette-224"

## precision-sweep  fp16 headroom of every LayerNorm and Performer core + fp16 agreement at SWEEP sizes (80,160,224,384), same weights -> reports/precision-sweep-<MODEL>.{json,md,png}
precision-sweep:
	$(PYTHON) -m evaluation.precision --model $(MODEL) $(call opt,--checkpoint,$(CHECKPOINT)) $(call opt,--weights,$(WEIGHTS)) \
		--what sweep --sweep $(SWEEP) --out $(or $(REPORT_DIR),reports) $(call opt,--data,$(DATA)) $(call opt,--limit,$(LIMIT)) $(ARGS)

ONLY        ?=
# OUT only when set on the command line: the evidence's own default is artifacts/precision-evidence-<MODEL>-<size>.
EVIDENCE_OUT = $(if $(filter command line environment,$(origin OUT)),--out $(OUT))
## precision-evidence  every precision decision re-measured on CHECKPOINT at IMG_SIZE: onnx, precision, calib (TensorRT + CPU, entropy/percentile/max; fp8 when calib has it), layers, parity [DATA=val CALIB_DATA=train LIMIT= ONLY=step,...]; resumable -> $(REPORT_DIR)/precision-evidence-<MODEL>-<size>.{json,md} + step reports
precision-evidence:
	$(PYTHON) -m evaluation.evidence --model $(MODEL) $(call opt,--checkpoint,$(CHECKPOINT)) $(call opt,--img-size,$(IMG_SIZE)) \
		$(call opt,--data,$(DATA)) $(call opt,--calib-data,$(CALIB_DATA)) --calib-size $(CALIB_SIZE) $(call opt,--limit,$(LIMIT)) \
		$(call opt,--only,$(ONLY)) $(EVIDENCE_OUT) --report-dir $(or $(REPORT_DIR),reports) $(ARGS)

GPU_PACK    ?= artifacts/gpu-pack
## gpu-pack     on the development machine: GPU_CHECKPOINT's weights alone + 160 val images -> artifacts/gpu-pack/ (< 64 MiB, to carry to a lent GPU)
gpu-pack:
	$(PYTHON) -m studies.gpu_check --pack $(GPU_PACK) --checkpoint $(GPU_CHECKPOINT) --data $(or $(DATA),$(REF_DATA)/val) $(ARGS)

## gpu-check    on a lent CUDA machine, < 8 min: golden parity, fp16/bf16 autocast agreement (GPU_CHECKPOINT, DATA), t2t_vit_t_14 training SDPA vs authors', torch.compile -> reports/gpu-check.{json,md} (ARGS=--dry-run on a CPU)
gpu-check:
	$(PYTHON) -m studies gpu $(call opt,--checkpoint,$(wildcard $(GPU_CHECKPOINT))) $(call opt,--data,$(DATA)) --out $(or $(REPORT_DIR),reports) $(ARGS)

## validate     top-1/top-5 of CHECKPOINT on DATA (a val folder) with the model's eval transform -> OUT/validate-*.{json,md}
validate:
	@test -n "$(DATA)" || { echo "make validate: error: set DATA=/path/to/val (an ImageFolder split), e.g. make validate CHECKPOINT=runs/t2t_vit_7/best.pth DATA=../shared/data/imagenette2/val" >&2; exit 2; }
	$(PYTHON) -m train.validate $(STAGE_ARGS) $(RUN_ARGS) --data $(DATA) $(call opt,--limit,$(LIMIT)) $(ARGS)

# ----- export (export/) -----
## onnx         <out>/<model>.fp32.onnx + .fp16.onnx + export report, validated on ORT CPU vs PyTorch (CHECKPOINT=... DATA=...)
onnx:
	$(PYTHON) -m export.to_onnx $(STAGE_ARGS) $(RUN_ARGS) $(call opt,--data,$(DATA)) $(ARGS)

# ----- calibration (calibration/) -----
MAX_DROP    ?= 1.0
TARGET      ?= tensorrt

## calib        int8 Q/DQ graph + ORT CPU accuracy report: make calib MODEL=.. CHECKPOINT=.. CALIB_DATA=../shared/data/imagenette2/train [CALIB_SIZE=1024] [CALIB_METHOD=entropy|percentile|max|all] [MAX_DROP=1.0] [TARGET=tensorrt|cpu] [PRECISION=fp8] [ARGS="--sensitivity stage"] -> <OUT>/<MODEL>.int8.onnx (TARGET=cpu: .int8-cpu.onnx; PRECISION=fp8: .fp8.onnx, float8e4m3fn Q/DQ)
calib:
	@test -n "$(CALIB_DATA)" || { echo "error: set CALIB_DATA=/path/to/train (an ImageFolder tree), e.g. make calib CALIB_DATA=../shared/data/imagenette2/train"; exit 2; }
	$(PYTHON) -m calibration.calib $(STAGE_ARGS) $(RUN_ARGS) --calib-data $(CALIB_DATA) --calib-size $(CALIB_SIZE) \
		--method $(CALIB_METHOD) --max-drop $(MAX_DROP) --target $(TARGET) --precision $(if $(filter fp8,$(PRECISION)),fp8,int8) $(ARGS)

# ModelOpt side by side: its own virtualenv (its onnx extra pins older onnx/onnxruntime than ours), never in .venv.
# The CPU torch wheel keeps pip from pulling a multi-GB CUDA torch (docs/fp8.md); not part of make install or CI.
MODELOPT_VENV  ?= .venv-modelopt
MODELOPT_PKG   ?= nvidia-modelopt[onnx]==0.47.0
MODELOPT_TORCH ?= torch==2.13.0+cpu
.PHONY: modelopt modelopt-venv modelopt-compare

## modelopt-venv  create .venv-modelopt (MODELOPT_VENV=) with nvidia-modelopt[onnx] and a CPU torch (once; a failed install is removed)
modelopt-venv: $(MODELOPT_VENV)/.installed
$(MODELOPT_VENV)/.installed:
	@rm -rf $(MODELOPT_VENV) && python3.11 -m venv $(MODELOPT_VENV) && \
	$(MODELOPT_VENV)/bin/python -m pip install '$(MODELOPT_PKG)' '$(MODELOPT_TORCH)' > $(MODELOPT_VENV).install.log 2>&1 \
	|| { echo "modelopt-venv: error: pip could not install $(MODELOPT_PKG) $(MODELOPT_TORCH) into $(MODELOPT_VENV) (log: $(MODELOPT_VENV).install.log); set MODELOPT_TORCH= to another torch wheel"; rm -rf $(MODELOPT_VENV); exit 2; }
	@touch $@

## modelopt     ModelOpt (int8, fp8; defaults, CPU calibration) beside our int8/fp8 on the same fp32 graph, calibration and val images: make modelopt MODEL=.. CHECKPOINT=.. CALIB_DATA=../shared/data/imagenette2/train [CALIB_SIZE=1024] -> reports/modelopt-<MODEL>.{json,md}
modelopt: modelopt-venv
	@$(MAKE) --no-print-directory modelopt-compare

## modelopt-compare  the same without creating the virtualenv (one line and exit 2 when it is missing)
modelopt-compare:
	@test -n "$(CALIB_DATA)" || { echo "error: set CALIB_DATA=/path/to/train (an ImageFolder tree), e.g. make modelopt CALIB_DATA=../shared/data/imagenette2/train"; exit 2; }
	$(PYTHON) -m calibration.compare_modelopt $(STAGE_ARGS) --calib-data $(CALIB_DATA) --calib-size $(CALIB_SIZE) \
		--modelopt-python $(MODELOPT_VENV)/bin/python $(ARGS)

# ----- engines (engines/) -----
BATCHES     ?=
LOG         ?=
.PHONY: bench-baselines trtexec-log

## engine       strongly typed TensorRT engine + sidecar from <OUT>/<MODEL>.<PRECISION>.onnx (needs TensorRT + GPU)
engine:
	$(PYTHON) -m engines.build $(ENGINE_ARGS) --precision $(PRECISION) $(ARGS)

## bench        trtexec batch sweep of the engine + ONNX Runtime/PyTorch baselines -> <OUT>/bench-engines-* (needs TensorRT)
bench:
	$(PYTHON) -m engines.bench $(STAGE_ARGS) --precision $(PRECISION) --tensorrt require $(call opt,--batches,$(BATCHES)) $(ARGS)

## bench-baselines  the same report without TensorRT (ONNX Runtime/PyTorch only; says why TensorRT did not run)
bench-baselines:
	$(PYTHON) -m engines.bench $(STAGE_ARGS) --precision $(PRECISION) --tensorrt off $(call opt,--batches,$(BATCHES)) $(ARGS)

## trtexec-log  print the performance summary of a saved trtexec log as JSON: make trtexec-log LOG=run.log
trtexec-log:
	@test -n "$(LOG)" || { echo "make trtexec-log: error: set LOG=/path/to/run.log (a saved trtexec output: trtexec ... 2>&1 | tee run.log)" >&2; exit 2; }
	$(PYTHON) -m engines.trtexec_log $(LOG) $(ARGS)

# ----- parity and demo -----
DEMO_DIR    ?= artifacts/demo

## parity       accuracy of every backend vs PyTorch fp32 on the same batches: make parity MODEL=.. CHECKPOINT=.. DATA=/path/val [LIMIT=N] [LABELS=LOC_val_solution.csv] [BACKENDS=pytorch,onnxruntime,tensorrt] [REQUIRE=tensorrt] [BATCH_SIZE=32] -> <OUT>/parity-<MODEL>.{json,md,png}
parity:
	@test -n "$(DATA)" || { echo "error: set DATA=/path/to/val (synset folders, or a flat folder with LABELS=...), e.g. make parity DATA=../shared/data/imagenette2/val"; exit 2; }
	$(PYTHON) -m evaluation.parity $(STAGE_ARGS) $(RUN_ARGS) --data $(DATA) $(call opt,--limit,$(LIMIT)) \
		$(call opt,--labels,$(LABELS)) $(call opt,--backends,$(BACKENDS)) $(call opt,--require,$(REQUIRE)) $(ARGS)

## demo         the whole pipeline on a small real dataset in a few minutes on a CPU -> artifacts/demo/ (DEMO_DIR=...; Imagenette when ../shared/data exists, else scikit-learn digits)
demo:
	$(PYTHON) -m evaluation.demo --out $(DEMO_DIR) $(ARGS)

.PHONY: layers precision
REPORT_DIR  ?= reports

## layers       which layer diverges first: every tensor of <OUT>/<MODEL>.<PRECISION>.onnx vs the fp32 graph on real images (Polygraphy; TensorRT too where present) -> <OUT>/layers-<MODEL>-<PRECISION>.{json,md,png}
layers:
	$(PYTHON) -m evaluation.layerwise $(ENGINE_ARGS) $(RUN_ARGS) --precision $(PRECISION) $(call opt,--data,$(DATA)) $(ARGS)

## precision    TensorRT precision evidence emulated on the CPU: TF32, fp16 LayerNorm, activation statistics -> $(REPORT_DIR)/precision-{tf32,layernorm}-<MODEL>.*, activations-<MODEL>.*
precision:
	$(PYTHON) -m evaluation.precision --model $(MODEL) $(call opt,--checkpoint,$(CHECKPOINT)) $(call opt,--img-size,$(IMG_SIZE)) \
		$(call opt,--weights,$(WEIGHTS)) --out $(REPORT_DIR) $(RUN_ARGS) $(call opt,--data,$(DATA)) $(call opt,--limit,$(LIMIT)) $(ARGS)

# ----- serving (serving/) -----
ARTIFACT    ?=
IMAGES      ?=
.PHONY: predict triton install-serve serve loadtest
HTTP_PORT   ?= 8000
GRPC_PORT   ?= 8001
TRITON_PYTHON ?= .venv-triton/bin/python

# The Triton server (nvidia-pytriton bundles tritonserver + its Python backend) pins numpy<2, so it gets its
# own virtualenv; a .pth appended to it reaches the project's .venv for torch/onnxruntime/timm, behind its
# own numpy 1.x.
install-serve:
	python3.11 -m venv .venv-triton
	$(TRITON_PYTHON) -m pip install 'nvidia-pytriton==0.7.0' 'numpy<2'
	$(PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(TRITON_PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz-t2t-vit-venv.pth"
# MODEL is passed only when set on the command line: an ONNX graph or engine records its own model.
SERVE_MODEL = $(if $(filter command line environment,$(origin MODEL)),--model $(MODEL))

## predict      top-5 classes per image through an artifact's own preprocessing: make predict ARTIFACT=<.onnx|.engine|checkpoint (+MODEL=)> IMAGES=a.jpg,b.png|folder [ARGS=--json] -> stdout
predict:
	@test -n "$(ARTIFACT)" || { echo "error: set ARTIFACT=<model>.<precision>.onnx, an .engine or a checkpoint (with MODEL=), e.g. make predict ARTIFACT=artifacts/t2t_vit_7/t2t_vit_7.fp32.onnx IMAGES=photo.jpg"; exit 2; }
	@test -n "$(IMAGES)" || { echo "error: set IMAGES=a.jpg,b.png (files and/or folders, comma-separated)"; exit 2; }
	$(PYTHON) -m serving.predict $(SERVE_MODEL) --artifact $(ARTIFACT) --images $(IMAGES) $(ARGS)

## triton       Triton model repository from MODEL's artifacts in OUT: onnxruntime_onnx per graph, tensorrt_plan per engine, a Python preprocessing model and the <MODEL>-classify ensemble -> <OUT>/triton/
triton:
	$(PYTHON) -m serving.triton_repo --model $(MODEL) --out $(OUT) $(ARGS)

## serve        Triton on 127.0.0.1 (HTTP_PORT=8000, GRPC_PORT=8001) serving OUT/MODEL.fp32.onnx (or ARTIFACT=) on the ONNX Runtime runner (an .engine: TensorRT) with dynamic batching; Ctrl-C stops it
serve:
	@test -x $(TRITON_PYTHON) || { echo "error: $(TRITON_PYTHON) not found: make install-serve (part of make install) creates the Triton virtualenv"; exit 2; }
	$(TRITON_PYTHON) -m serving.server $(if $(ARTIFACT),$(SERVE_MODEL) --artifact $(ARTIFACT),--model $(MODEL) --out $(OUT)) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) $(ARGS)

## loadtest     Triton (HTTP and gRPC, concurrency 1,4,16) vs the same runner called directly -> reports/serve-<MODEL>.{json,md,png}
loadtest:
	$(PYTHON) -m serving.loadtest --model $(MODEL) --artifacts $(OUT) $(call opt,--artifact,$(ARTIFACT)) $(ARGS)

# ----- studies (studies/): one target per question, each writes its report to reports/ -----
.PHONY: studies bench-model bench-train bench-onnx bench-calib bench-cpu bench-busy

## studies      list the questions the studies answer (python -m studies <question>; make bench-<question>)
studies:
	$(PYTHON) -m studies --help

## bench-model  SDPA vs explicit attention and fp32 throughput -> reports/bench-model-*.{json,md}
bench-model:
	$(PYTHON) -m studies model --out reports $(ARGS)

## bench-train  training img/s + peak memory, t2t_vit_7 and t2t_vit_t_14, SDPA vs explicit attention -> reports/bench-train-*.{json,md}
bench-train:
	$(PYTHON) -m studies train --out reports $(ARGS)

## bench-onnx   ORT CPU: patterned fp32 vs plain export vs fp16, t2t_vit_7/14 at 224 -> reports/bench-onnx-cpu.{json,md}
bench-onnx:
	$(PYTHON) -m studies onnx --out reports $(ARGS)

## bench-calib  ORT CPU throughput of fp32/fp16/int8 graphs (t2t_vit_7, t2t_vit_14, 224, batch 1 and 8) -> reports/bench-calib-cpu.{json,md}
bench-calib:
	$(PYTHON) -m studies calib --out reports $(call opt,--calib-data,$(CALIB_DATA)) $(ARGS)

## bench-cpu    CPU inference vs the authors' code, one run: ORT fp32/int8-cpu + PyTorch eager/compile/bf16, t2t_vit_7/14, 224, batch 1 and 8, per-op profiles, GFLOP/s vs peak -> reports/bench-cpu.{json,md,png}
bench-cpu:
	$(PYTHON) -m studies cpu --out reports $(call opt,--calib-data,$(CALIB_DATA)) $(ARGS)

## bench-busy   the demo's training step idle and with a competing job, per thread setting -> reports/bench-busy.{json,md,png}
bench-busy:
	$(PYTHON) -m studies busy --out reports $(ARGS)
