# Two commands do all the set-up on a fresh machine:
#   make book   create .venv if missing, install everything, build the book (executing every chapter)
#   make test   the same set-up, then the book (the browser test needs the built site), the tests in
#               tests/ (the browser test tests/test_site.py among them) and every notebook under nbval,
#               run from a wheel in a fresh virtual environment outside the repository
#               (scripts/colab_check.py), so the notebooks execute once more, not twice
# Quick mode (CPU-sized notebooks) is on by itself where no CUDA device is present;
# DDPM_BOOK_QUICK=1 or 0 forces it either way.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ddpm-installed
JOBS ?= 2

.PHONY: help setup book test test-unit test-site test-notebooks test-notebooks-inplace screenshot clean

help:
	@echo "make book   - set up .venv and build the book into _build/html (executes every chapter)"
	@echo "make test   - set up .venv, build the book, run tests/ and every notebook under nbval"
	@echo "make test-notebooks - the Colab-readiness check: nbval on copies, ddpm_lib from a wheel, fresh venv"
	@echo "make screenshot     - rerun the browser test and update book/figures/schedule_sliders_screenshot.png"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

book: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/jupyter-book build . --builder html -W -n --keep-going
	@echo "The book is in _build/html/index.html"

# In this order (also under make -j): the browser test in tests/ reads the site that `book` built.
test: $(STAMP)
	$(MAKE) --no-print-directory book
	$(MAKE) --no-print-directory test-unit
	$(MAKE) --no-print-directory test-notebooks

# With several pytest workers (or kernels) on few cores, one thread each avoids oversubscription
# (torch's OpenMP threads otherwise fight each other and small ops get 10-70x slower).
# --dist loadgroup keeps the browser test (one browser, one server) on one worker.
# scripts/ensure_triton.py: the Triton that torch names, for the kernel tests under Triton's interpreter
test-unit: $(STAMP)
	$(PY) scripts/ensure_triton.py
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/ -n $(JOBS) --dist loadgroup -q --durations=15

# The browser test alone, on the site in _build/html (built first when older than the book's sources).
test-site: $(STAMP)
	$(PY) -m pytest tests/test_site.py -q -p no:cacheprovider

# Every notebook under nbval in quick mode, as on Colab: ddpm_lib from a freshly built wheel in a fresh
# virtual environment, the notebooks copied to a folder outside the repository.
test-notebooks: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) scripts/colab_check.py -n $(JOBS) --report _build/colab_check.json

# The quicker in-place run (the repository's .venv and book/): for working on a chapter.
test-notebooks-inplace: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest --nbval-lax book/ -n $(JOBS) --dist loadfile -q -p no:cacheprovider --durations=40

screenshot: $(STAMP)
	DDPM_UPDATE_FIGURES=1 $(PY) -m pytest tests/test_site.py -q -p no:cacheprovider -k schedule

clean:
	rm -rf _build
