# Two commands do all set-up on a fresh machine with nothing but Python:
#   make demo   - venv, install, fetch the models, run the end-to-end demo
#   make test   - venv with the dev extras, fetch the models, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; on a GPU machine install the CUDA build of the same version first.
TORCH  ?= torch==2.13.0

.PHONY: demo test venv models clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[train,export,dev,triton]'
	touch $@

venv: $(VENV)/.installed

models: venv
	$(BIN)/petal-models fetch

test: models
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra

demo: models
	$(BIN)/python -m petal_demo

clean:
	rm -rf $(VENV) demo_out .pytest_cache
