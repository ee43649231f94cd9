# calibkit: two commands do everything on a fresh machine (Python 3.11 is the only prerequisite).
#   make tutorial   set up, prepare data, run every notebook with its full parameters
#   make test       set up, prepare data, run the whole test suite (smoke notebooks included)
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.calibkit-installed
PROFILE ?= full

.PHONY: setup data tutorial test lab clean

# A new environment takes about 6.2 GiB (torch 2.14.1 comes with its CUDA libraries); fail early and clearly
# instead of with pip's "No space left on device" halfway through the install.
NEED_GIB := 7
export DISK_CHECK = import os, shutil, sys; free = shutil.disk_usage(".").free / 2**30; \
  sys.exit(0 if free >= $(NEED_GIB) else f"make: only {free:.1f} GiB free on the disk of {os.getcwd()}; \
  the environment in $(VENV) needs about $(NEED_GIB) GiB (torch 2.14.1 with its CUDA libraries). Free some space and re-run.")

# Re-runnable: the environment is rebuilt only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -c "$$DISK_CHECK"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (calibkit)"
	@touch $(STAMP)

setup: $(STAMP)

data: setup
	$(PY) data_scripts/ensure_data.py

tutorial: data
	$(PY) -m calibkit.tutorial.runner --profile $(PROFILE)

test: data
	$(PY) -m pytest $(PYTEST_ARGS)

# JupyterLab with the project's kernel; as root (containers, CI machines) jupyter needs --allow-root
lab: data
	$(VENV)/bin/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

clean:
	rm -rf outputs .pytest_cache .hypothesis
