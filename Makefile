# statsd: every target sets itself up from a fresh checkout with only python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test bench bench-monarc binary binary-test clean

$(BIN)/statsd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test-deps: $(BIN)/statsd
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# make run [PORT=5004] [HOST=0.0.0.0] [DATABASE=path.json]: each one given becomes the flag of the same name
run: $(BIN)/statsd
	$(BIN)/statsd serve $(if $(PORT),--port $(PORT)) $(if $(HOST),--host $(HOST)) $(if $(DATABASE),--database $(DATABASE))

test: $(VENV)/.test-deps
	$(BIN)/pytest -q

bench: $(BIN)/statsd
	PYTHON=$(abspath $(BIN)/python) bash bench/run.sh

# The real MONARC workload, statsd beside the upstream statsservice (installed into bench/.monarc).
bench-monarc: $(BIN)/statsd
	BENCH_COMMAND='make bench-monarc' $(BIN)/python bench/monarc.py

binary: $(BIN)/statsd
	packaging/build.sh

binary-test: binary $(VENV)/.test-deps
	STATSD_BINARY=dist/statsd $(BIN)/pytest -q tests/test_binary.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
