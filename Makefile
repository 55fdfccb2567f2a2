# The two commands a new user needs:
#   make demo   - the whole pipeline end to end on generated photos and tiny models; it starts the four
#                 services itself, on localhost (nothing external needed)
#   make test   - the test suite's fast default (under 15 minutes on 2 cores); CI runs it and then
#                 `make test-slow`: the tests marked slow (chaos runs, multi-process training, full-size plans)
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test test-slow env protos check-protos lint layers types clean

# Three distributions from this repository: fluxlora-api (protos/: the contract and the shared floor),
# fluxlora-client (clients/python: SDK and CLI, no torch) and fluxlora (the servers). The servers name the
# other two by path; the second install makes all three editable for development.
$(BIN)/fluxlora: pyproject.toml protos/pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 resolves to the local CPU wheel on these machines.
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -e ./protos -e ./clients/python
	touch $@

env: $(BIN)/fluxlora

demo: env
	$(BIN)/fluxlora demo --workdir demo-output

test: env check-protos lint layers types
	$(BIN)/pytest -q -m "not slow"

test-slow: env
	$(BIN)/pytest -q -m slow

protos: env
	$(BIN)/python protos/generate.py

check-protos: env
	$(BIN)/python protos/generate.py --check

lint: env
	$(BIN)/ruff check services clients tests protos/generate.py protos/fluxlora_api/shared bench

# The floors as import contracts (pyproject.toml [tool.importlinter]): imports only look down, no circles,
# the client imports no server code.
layers: env
	$(BIN)/lint-imports

# Types of the shared floor, the common floor, the domain records and the job runtime ([tool.mypy]).
types: env
	$(BIN)/mypy

clean:
	rm -rf demo-output fluxlora-data .pytest_cache
