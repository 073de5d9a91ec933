# The two commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pytest-xdist workers: 3 on the 2-core CI machine (many tests wait on subprocesses, Slurm or
# sleeps; each still starts at most 4 processes of its own). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

# Bytecode on every core: compileall -j 0 takes a fifth of the time pip's own compile does. Its
# status is 1 for torch's Python 3.12-only test file, which pip's compile skips silently too.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/cpu_demo.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=25 tests

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs
