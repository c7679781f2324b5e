# Two commands do all the set-up on a fresh machine:
#   make book   create .venv if missing, install everything, build the book (executing every chapter)
#   make test   the same set-up, then the unit tests and every notebook under nbval
# Quick mode (CPU-sized notebooks) is on by itself where no CUDA device is present;
# DDPM_BOOK_QUICK=1 or 0 forces it either way.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ddpm-installed
JOBS ?= 2

.PHONY: help setup book test test-unit test-notebooks clean

help:
	@echo "make book   - set up .venv and build the book into _build/html (executes every chapter)"
	@echo "make test   - set up .venv, run tests/ and every notebook under nbval"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --builder html -W -n --keep-going
	@echo "The book is in _build/html/index.html"

test: test-unit test-notebooks

# With several pytest workers on few cores, one thread per worker avoids oversubscription
# (torch's OpenMP threads otherwise fight each other and small ops get 10-70x slower).
test-unit: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/ -n $(JOBS) -q --durations=15

test-notebooks: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest --nbval-lax book/ -n $(JOBS) --dist loadfile -q -p no:cacheprovider --durations=40

clean:
	rm -rf _build
