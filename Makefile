# The two commands of the README: `make demo` and `make test`. Both set everything up first
# (a virtual environment in .venv, idempotent: a second run only checks a stamp file).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hpcviz-installed
DEMO_RUN ?= results/demo

.PHONY: setup demo test check clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "error: $(PYTHON) is older than 3.10; hint: make PYTHON=python3.11"; exit 2; }
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || \
		{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; \
		  else echo "error: python venv is missing; hint: sudo apt-get install python3-venv"; exit 2; fi; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The whole pipeline here on the CPU: train a ResNet-20 on the built-in data, visualize 16 validation
# images in 2 array tasks (activations, deconvnet, inversions), the feature visualization of every channel
# (asked for: a local CPU run leaves it out by default; 48 steps at most, not 128: a third of the time, see
# docs/atlas.md), then the report and its atlas.
# A second `make demo` continues the same run (finished stages are skipped); `make clean-demo` starts afresh.
demo: setup
	$(PY) jobs/launch_pipeline.py --cluster local --run $(DEMO_RUN) --resume \
		--arch resnet20 --data builtin --epochs 7 --batch-size 128 --lr 0.2 \
		--images 16 --tasks 2 --featviz-blocks all --featviz-steps 48
	@echo "report: $(DEMO_RUN)/report/report.html (and report.md, figures/, tables/)"
	@echo "atlas:  $(DEMO_RUN)/report/atlas/index.html (a card per channel: feature visualization, examples, classes)"

# lint and type checks first (ruff with import sorting, mypy on hpcviz/; configured in pyproject.toml), then the suite
# on 2 workers (a file stays on one, the SLURM tests share one: tests/conftest.py) with its 40 slowest tests listed
test: setup
	$(VENV)/bin/ruff check hpcviz jobs tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=40

# the fast loop while developing (<= 3 minutes on 2 cores): the same checks, then the tests not marked slow, slurm
# or gpu; `make test` stays the whole suite, and CI runs it
check: setup
	$(VENV)/bin/ruff check hpcviz jobs tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow and not slurm and not gpu"

clean-demo:
	rm -rf $(DEMO_RUN)
