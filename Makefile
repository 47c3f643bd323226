# Two commands do everything on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo demo-tv bench clean

install: $(STAMP)

# Reinstall when the dependency list changes; the editable install picks up code changes by itself.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check gram_ray tests

# The main job on generated data: text + video + audio (add the text-video row with `make demo-tv`).
demo: $(STAMP)
	$(BIN)/gram-ray demo --out demo-out

demo-tv: $(STAMP)
	$(BIN)/gram-ray demo --out demo-out --modalities text,video

bench: $(STAMP)
	$(BIN)/gram-ray bench volume

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
