# The two commands a new user needs:
#   make demo   - the whole pipeline end to end on generated photos and tiny models; it starts the four
#                 services itself, on localhost (nothing external needed)
#   make test   - the test suite (what CI runs)
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test env protos check-protos lint clean

$(BIN)/fluxlora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 resolves to the local CPU wheel on these machines.
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

env: $(BIN)/fluxlora

demo: env
	$(BIN)/fluxlora demo --workdir demo-output

test: env check-protos lint
	$(BIN)/pytest -q

protos: env
	$(BIN)/python protos/generate.py

check-protos: env
	$(BIN)/python protos/generate.py --check

lint: env
	$(BIN)/ruff check services clients tests protos/generate.py bench

clean:
	rm -rf demo-output fluxlora-data .pytest_cache
