# Entry points: `make demo` (the main job), `make quickstart` and `make test`. Each sets up what it needs: a
# virtual environment in .venv, the package (`make test` adds the dev tools), and the Fashion-MNIST files
# (Debian package where apt exists).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
DEMO_OUT ?= runs/demo
QUICKSTART_OUT ?= runs/quickstart

.PHONY: demo quickstart test data setup setup-dev lint docs bench clean

setup: $(STAMP) data
setup-dev: $(DEV_STAMP) data

# --no-compile: byte-compiling all of torch took three times as long as installing it (75 s against 25 s on a
# busy 2-core machine). What a run imports is compiled once after the install instead, even where
# PYTHONDONTWRITEBYTECODE is set (otherwise every sweep worker would recompile torch from source).
PIP := $(PY) -m pip install --quiet --no-compile
WARM_UP := import sys; sys.dont_write_bytecode = False; \
	import torch._dynamo, byztrain.api, byztrain.experiments.run_report, matplotlib.backends.backend_agg

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build on local disk (an unpinned torch pulls a multi-GB CUDA build)
	$(PIP) "torch==2.13.0"
	$(PIP) -e .
	$(PY) -c "$(WARM_UP)"
	touch $(STAMP)

# The test tools (pytest, hypothesis, ruff, and nbclient + ipykernel to execute the example notebook),
# byte-compiled as pip does by default: they are small, and the notebook's kernel imports many of them.
$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(DEV_STAMP)

# Fashion-MNIST: Debian's dataset-fashion-mnist where apt exists; otherwise byztrain downloads it on first use.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then \
		echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) && \
		echo "Fashion-MNIST: installed dataset-fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
		sudo apt-get install -y -qq dataset-fashion-mnist || true; \
	else \
		$(PY) -c "from byztrain.tasks import load_dataset; load_dataset('fashion-mnist')"; \
	fi

# The mission: plain averaging vs BTARD when 7 of 16 peers attack (sign flipping, ALIE), with the clean run for
# reference; 6 runs, 2 at a time, then the outcome table and the report's paths (experiments/demo.yaml).
demo: setup
	@echo "demo: 16 peers, 7 Byzantine from step 50; mean vs BTARD under none / sign_flip / alie (6 runs, 2 at a time)"
	$(VENV)/bin/byztrain sweep experiments/demo.yaml --jobs 2 --out $(DEMO_OUT)
	$(VENV)/bin/byztrain report $(DEMO_OUT)

# One run, no attack: 16 honest peers, plain averaging, 1000 steps; ends with its outcome and report command.
quickstart: setup
	$(VENV)/bin/byztrain run experiments/quickstart.yaml --out $(QUICKSTART_OUT)

test: setup-dev
	$(VENV)/bin/pytest -q

# docs/config.md is generated from the config dataclasses, and the registry tables in docs/*.md (between
# <!-- registry:KIND --> markers) from the registries; tests/test_config_doc.py checks both are current.
docs: setup
	$(PY) -c 'import pathlib; from byztrain.config import config_reference; pathlib.Path("docs/config.md").write_text(config_reference())'
	$(PY) -c 'import pathlib; from byztrain.listing import generated_docs; [p.write_text(t) for p, t in generated_docs(pathlib.Path(".")).items()]'

lint: setup-dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
