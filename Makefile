# The two set-up commands of the README:  make install  &&  make test
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test test-slow lint docs bench clean

install:
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# the CPU wheel of torch first: an unpinned torch would pull gigabytes of CUDA wheels
	$(PIP) install --quiet "torch==2.13.0"
	# the [betty] extra: betty-ml 0.2.1 declares python<3.11 but installs and runs on 3.11 (with the
	# numpy<2.3 it is tested with); installed first with --ignore-requires-python, the extra below is
	# then satisfied
	$(PIP) install --quiet --ignore-requires-python "betty-ml==0.2.1" "numpy<2.3"
	# every extra: betty, torchopt (linear_solve.torchopt_cg and a peer), fast (numba: compiled per-sample
	# accelerator steps), dev (tests, build), recipes, docs
	$(PIP) install --quiet -e ".[betty,torchopt,fast,dev,recipes,docs]"
	# peers of benchmarks/compare.py and benchmarks/deq.py (not dependencies of the package); boat-torch's
	# torchvision requirement would pull a CUDA torch, so --no-deps (its other needs are installed
	# above); torchdeq needs only torch and numpy
	$(PIP) install --quiet --no-deps "higher==0.2.1" "boat-torch==1.1.1" "torchdeq==0.1.0"
	$(PY) -c "import torch, torchopt, betty, hodl_plugin; print('installed: torch', torch.__version__, '| torchopt', torchopt.__version__, '| hodl_plugin', hodl_plugin.__version__)"

test:
	$(VENV)/bin/ruff check hodl_plugin tests benchmarks recipes examples docs/conf.py docs/_intersphinx
	$(PY) -m pytest -q
	$(MAKE) docs

# HTML with warnings as errors and every cross-reference resolved (nitpicky), the example gallery
# executed. The pages' code blocks (doctest output included) run in pytest above, each in a fresh
# interpreter (tests/test_docs_examples.py), and the docstring examples with --doctest-modules.
docs:
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

test-slow:  # every recipe and benchmark run as typed (--quick) and other long tests; exit code 5 (none marked slow) is not a failure
	$(PY) -m pytest -q -m slow tests || [ $$? -eq 5 ]

lint:
	$(VENV)/bin/ruff check hodl_plugin tests benchmarks recipes examples docs/conf.py docs/_intersphinx

bench:
	$(PY) -m benchmarks.hypergrad
	$(PY) -m benchmarks.betty_overhead
	$(PY) -m benchmarks.compare

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache docs/_build docs/api docs/generated docs/auto_examples
