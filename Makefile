# fedloom: `make demo` runs a real federated experiment; `make test` runs the test suite.
# Both create .venv and install everything on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; installed before the project so pip never fetches a CUDA build.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test serve lint clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[server,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedloom demo

# Most tests wait on servers and processes rather than compute, so two workers share them; the few
# marked `serial` measure a rate or a deadline and run afterwards with the machine to themselves.
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=30 -n 2 --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -q -p no:cacheprovider -m serial

# The fast tier: the tests that start no server (marker `unit`, set by path in tests/conftest.py).
.PHONY: test-unit
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m unit

serve: $(STAMP)
	$(BIN)/fedloom serve

lint: $(STAMP)
	$(BIN)/ruff check fedloom fedloom_core fedloom_tools workflows activities api workers tests benchmarks

# The benchmarks need the optional `bench` extra (Flower's aggregation functions for comparison).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[server,dev,bench]"
	$(BIN)/python benchmarks/run_all.py

# The JS client's npm packages (clients/js), and the dashboard's copies of the client and uPlot refreshed.
.PHONY: js
js:
	cd clients/js && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund && npm run vendor

clean:
	rm -rf $(VENV) .fedloom
