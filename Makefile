# Two entry points: `make demo` (the main job) and `make test`. Both set up everything they need:
# a virtual environment in .venv, the package, and the Fashion-MNIST files (Debian package where apt exists).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= runs/quickstart

.PHONY: demo demo-grid test data setup lint docs bench clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build on local disk (an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

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

demo: setup
	$(VENV)/bin/byztrain run experiments/quickstart.yaml --out $(DEMO_OUT)

# The experiments demo: mean vs BTARD under none / sign_flip / ALIE, then the report (figures + tables).
demo-grid: setup
	$(VENV)/bin/byztrain sweep experiments/demo.yaml --jobs 2
	$(VENV)/bin/byztrain report runs/demo

test: setup
	$(VENV)/bin/pytest -q

# docs/config.md is generated from the config dataclasses (tests/test_config_doc.py checks it is current).
docs: setup
	$(PY) -c 'import pathlib; from byztrain.config import config_reference; pathlib.Path("docs/config.md").write_text(config_reference())'

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
