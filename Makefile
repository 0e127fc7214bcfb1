# simple_diffusion: `make book` builds the book, `make test` runs every check.
# Both create .venv on first use. TORCH picks the torch wheel, e.g. TORCH=torch==2.13.0 (CPU).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch
PYTEST_ARGS ?=
STAMP  := $(VENV)/.installed

.PHONY: install export check-sync lint format pytest nbval pytest-nbval book book-build screens test wheel clean strip

$(STAMP): settings.ini setup.py pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

export: install            ## notebooks -> simple_diffusion/
	$(VENV)/bin/nbdev_export

check-sync: export        ## fail if simple_diffusion/ differs from what the notebooks export
	@git diff --exit-code --stat -- simple_diffusion || \
	  { echo "simple_diffusion/ is out of sync with nbs/: run nbdev_export and commit"; exit 1; }
	@test -z "$$(git ls-files --others --exclude-standard -- simple_diffusion)" || \
	  { echo "untracked exported files:"; git ls-files --others --exclude-standard -- simple_diffusion; exit 1; }

lint: install              ## ruff on the exported package (pyflakes, one statement a line)
	$(VENV)/bin/ruff check simple_diffusion

format: install            ## ruff-format every notebook's code cells (then run `make export`)
	$(VENV)/bin/ruff format nbs/*.ipynb

pytest: install            ## package contracts (tests/), including 'notebooks carry no outputs'
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

nbval: install             ## execute every notebook in nbs/ as a test
	$(PY) -m pytest nbs --nbval-lax --nbval-current-env -q -p no:cacheprovider $(PYTEST_ARGS)

book: export               ## execute every notebook in _toc.yml and render _build/html
	$(MAKE) book-build

book-build: install        ## the book from the current module (no export: safe beside pytest)
	rm -rf _build/html
	MPLBACKEND=module://matplotlib_inline.backend_inline $(VENV)/bin/jupyter-book build . -W -n --keep-going

# The notebooks are executed twice (nbval, and the book): run the two side by side, one per core,
# the package tests first on nbval's core. -O prints each job's output when it finishes; -k runs
# every job to the end, so one run reports every failure; any failure still fails `make test`.
test: check-sync lint
	$(MAKE) -k -j2 -O book-build pytest-nbval

pytest-nbval: pytest
	$(MAKE) nbval

screens:                   ## screenshot every page of _build/html and measure over-wide maths (needs chromium + playwright)
	$(PY) scripts/screenshot_book.py --html _build/html --self-test
	$(PY) scripts/screenshot_book.py --html _build/html --out _build/screens --strict

wheel: install             ## sdist + wheel into dist/
	rm -rf dist build
	$(PY) -m build --no-isolation --outdir dist .

strip:                     ## remove outputs from every notebook, keeping tags and metadata
	$(VENV)/bin/nbstripout --keep-id nbs/*.ipynb

clean:
	rm -rf _build dist build *.egg-info
