# Two commands for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: venv demo test lint run check clean

$(BIN)/dicom-gateway: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/dicom-gateway

demo: venv
	$(BIN)/dicom-gateway demo

run: venv
	$(BIN)/dicom-gateway run rules/example.toml

check: venv
	$(BIN)/dicom-gateway check rules/example.toml

test: venv
	$(BIN)/ruff check gateway tests bench
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check gateway tests bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
