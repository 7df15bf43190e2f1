# Quick start on a machine that has only Python (>= 3.10) and a C++ compiler:
#
#     make demo       # trains the demo (README, "Two commands")
#     make test       # runs the test suite (everything; CI runs this)
#     make test-fast  # the suite without the tests marked slow, in $(FAST_JOBS) processes (pytest-xdist)
#
# Each target creates (or reuses) the virtual environment $(VENV), installs $(TORCH) and tscd with its
# test extra into it (`pip install -e ".[test]"`: the extension tscd._C is compiled against that torch),
# then runs. The install is redone only when $(TORCH), setup.py, pyproject.toml, the build backend or
# csrc/ change. Variables (make VAR=value):
#
#     PYTHON        the Python that creates the venv (default python3)
#     VENV          the venv folder (default .venv)
#     TORCH         what `pip install` gets for torch: a pinned release by default; e.g.
#                   TORCH="torch==2.14.1 torchvision==0.29.1 --index-url <your CUDA wheel index>"
#     EXTRAS        the extras installed with tscd (default test)
#     ARGS          demo: config overrides (e.g. ARGS="train.max_iters=30"); compat: its arguments
#     PYTEST_ARGS   test, test-fast: pytest's arguments (default -q)
#     FAST_JOBS     test-fast: pytest-xdist processes (default 2, one per core of a 2-core machine)
#
# Build switches pass through the environment (TSCD_BUILD_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS, ...: README).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test
ARGS ?=
PYTEST_ARGS ?= -q
FAST_JOBS ?= 2

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.tscd-installed
TORCH_SPEC := $(VENV)/.tscd-torch
BUILD_INPUTS := setup.py pyproject.toml $(wildcard _build/*.py) $(wildcard csrc/*.* csrc/*/*.*)

.PHONY: help install demo test test-fast compat info FORCE

help:
	@echo "make demo       create/reuse $(VENV), install torch + tscd, train the demo (configs/demo.yaml)"
	@echo "make test       create/reuse $(VENV), install torch + tscd, run the test suite"
	@echo "make test-fast  the same without the tests marked slow (pytest -m 'not slow' -n $(FAST_JOBS))"
	@echo "make compat     create/reuse $(VENV), install torch + tscd, run bench/compat.sh"
	@echo "make install    only the environment; make info: \`tscd info\` in it"
	@echo "variables: PYTHON=$(PYTHON) VENV=$(VENV) TORCH='$(TORCH)' EXTRAS=$(EXTRAS) ARGS=... PYTEST_ARGS=..."

$(VPY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "make: tscd needs Python >= 3.10; '$(PYTHON)' is not one (set PYTHON=/path/to/python3.x)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "make: '$(PYTHON) -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
	$(VPY) -m pip install --upgrade pip

# rewritten (so newer) only when $(TORCH) differs from what this venv got last time
$(TORCH_SPEC): $(VPY) FORCE
	@echo '$(TORCH)' | cmp -s - $@ || { $(VPY) -m pip install $(TORCH) && echo '$(TORCH)' > $@; }

$(STAMP): $(TORCH_SPEC) $(BUILD_INPUTS)
	$(VPY) -m pip install -e ".$(if $(EXTRAS),[$(EXTRAS)])"
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tscd train --config configs/demo.yaml $(ARGS)

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VPY) -m pytest -m "not slow" -n $(FAST_JOBS) $(PYTEST_ARGS)

compat: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash bench/compat.sh $(ARGS)

info: $(STAMP)
	$(VENV)/bin/tscd info

FORCE:
