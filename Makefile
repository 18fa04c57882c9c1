# Two commands on a fresh machine:  make demo   |   make test
# torch is installed first: TORCH_SPEC (default torch==2.13.0), from TORCH_INDEX_URL when set
# (e.g. https://download.pytorch.org/whl/cpu for a CPU build on a machine without CUDA).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: install test test-fast test-heavy lint demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Everything but the heavy tier, in two runs: what runs in one process (the unit tier and the
# single-process end-to-end runs) on TEST_WORKERS pytest-xdist workers (a test file stays on one
# worker, so its module fixtures are built once), then the multi-process tier one test at a time
# (each of its runs uses 2 cores) with one line per test file and the 15 slowest tests. Both runs
# always run; either failing fails. "no tests collected" (5) counts as a pass for a PYTEST_ARGS
# that selects one run's tests only.
test: install
	$(PY) -m pytest -m "not dist and not heavy" -n $(TEST_WORKERS) --dist loadfile \
	  --durations=10 $(PYTEST_ARGS); u=$$?; \
	$(PY) -m pytest -m "dist and not heavy" --durations=15 $(PYTEST_ARGS); d=$$?; \
	for rc in $$u $$d; do if [ $$rc != 0 ] && [ $$rc != 5 ]; then exit $$rc; fi; done; \
	if [ $$u = 5 ] && [ $$d = 5 ]; then echo "make test: no test selected" >&2; exit 5; fi

# unit tests only (no multi-process, no end-to-end runs)
test-fast: install
	$(PY) -m pytest -m "not dist and not slow and not heavy" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# the heavy tier only (docs/testing.md): long repetitions, inductor compiles
test-heavy: install
	$(PY) -m pytest -m heavy --durations=15 $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check janus_train janus_demo tests benchmarks && $(VENV)/bin/ruff format --check .

demo: install
	bash launch/demo.sh

clean:
	rm -rf $(VENV) demo_out runs outputs
