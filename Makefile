# The two commands the README promises: `make quickstart` and `make test`.
# Both create .venv (in the repo) when missing and install the pinned tree into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help quickstart test check plan venv clean-quickstart
.DEFAULT_GOAL := help

# `make` alone: the commands a user has
help:
	@echo "make quickstart        the whole pipeline offline on sample data, in ./quickstart (a git +"
	@echo "                       DVC project: dvc repro / metrics diff / exp run work there);"
	@echo "                       5-18 min on 2 CPU cores, plus the first install"
	@echo "make test              the test suite (the quickstart's workflows included)"
	@echo "make check             every params.yaml problem at once, then the production inputs"
	@echo "                       that are missing (data/raw, hub revisions, OPENAI_API_KEY)"
	@echo "make plan              what the LLM stages that would run will cost, offline, writing"
	@echo "                       nothing (WORKSPACE=quickstart for the quickstart's)"
	@echo "make clean-quickstart  remove ./quickstart and its DVC remote"
	@echo "make venv              only install .venv (every command above does it when needed)"

venv: $(STAMP)

# torch first and on its own: `torch==2.13.0` resolves to the CPU wheel on CPU machines
# (and the CUDA build on GPU ones); everything else comes from the full lock.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	touch $(STAMP)

# the workspace (a git + DVC project, git-ignored here) and its default DVC remote beside it
QUICKSTART ?= quickstart
quickstart: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/quickstart.py --workspace $(QUICKSTART)

# every params.yaml problem at once: each section against its stage's schema, cross-section
# rules, a stale dvc.vars.yaml (stages/check.py)
check: $(STAMP)
	$(BIN)/python -m stages.check

# what the LLM stages that would run will cost (requests not cached, tokens, $ online and
# batch), offline, writing nothing (stages/plan.py); `make plan WORKSPACE=quickstart`
WORKSPACE ?= .
plan: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m stages.plan --root $(WORKSPACE)

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

clean-quickstart:
	rm -rf $(QUICKSTART) $(QUICKSTART)-dvc-remote
