# Both targets work from a clean clone: they create .venv and install the project into it.
# `make run` installs what the app needs to run; `make test` adds the test and lint tools (the dev extra).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev

.PHONY: run test lint bench clean

$(RUNTIME): pyproject.toml
	@test -x $(BIN)/python || { echo "moe-tui: creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "moe-tui: installing (MLX, mlx-lm, Textual...); the first time takes a few minutes"
	$(BIN)/python -m pip install --upgrade --disable-pip-version-check --progress-bar on pip
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar on -e .
	touch $(RUNTIME)

$(DEV): $(RUNTIME)
	@echo "moe-tui: installing the test tools (the dev extra)"
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar on -e '.[dev]'
	touch $(DEV)

run: $(RUNTIME)
	$(BIN)/moe

test: $(DEV)
	$(BIN)/python -m pytest

lint: $(DEV)
	$(BIN)/ruff check inference app tests scripts

bench: $(RUNTIME)
	$(BIN)/moe bench --synthetic

clean:
	rm -rf $(VENV) .pytest_cache
