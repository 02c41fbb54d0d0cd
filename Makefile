# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev
PROTO_TOOLS := .venv-proto
STAMP_PROTO := $(PROTO_TOOLS)/.installed
CONFIG ?= models/gateway.yaml
LISTEN ?= 127.0.0.1:8001
ARGS ?=

.PHONY: run test test-fast bench proto proto-check lint fmt models demo-data clean venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_RUN): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@ $(STAMP_RUN)

venv: $(STAMP_DEV)

# The protobuf code generator lives in its own venv: its protobuf (< 6) must not decide the project's.
$(STAMP_PROTO): scripts/proto-tools.txt
	$(PYTHON) -m venv $(PROTO_TOOLS)
	$(PROTO_TOOLS)/bin/python -m pip install -q -r scripts/proto-tools.txt
	touch $@

# A development admin token for the local demo; production sets its own (see README).
GATEWAY_ADMIN_TOKENS ?= dev=dev-admin-token-change-me
export GATEWAY_ADMIN_TOKENS

run: $(STAMP_RUN)
	$(VENV)/bin/gateway serve --config $(CONFIG) --listen $(LISTEN) $(ARGS)

test: $(STAMP_DEV) proto-check
	$(PY) -m pytest -q $(ARGS)

# The suite without the tests marked slow (processes, load, statistics): for quick iterations. CI runs make test.
test-fast: $(STAMP_DEV)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP_DEV)
	$(PY) -m benchmarks $(ARGS)

proto: $(STAMP_DEV) $(STAMP_PROTO)
	PYTHON=$(PY) PROTOC_PYTHON=$(PROTO_TOOLS)/bin/python scripts/gen_proto.sh

# Fails when the checked-in generated code differs from what proto/ produces.
proto-check: $(STAMP_DEV) $(STAMP_PROTO)
	@PYTHON=$(PY) PROTOC_PYTHON=$(PROTO_TOOLS)/bin/python scripts/gen_proto.sh
	@git diff --quiet --exit-code -- gateway/pb && test -z "$$(git status --porcelain -- gateway/pb)" \
		|| { echo "gateway/pb is stale: run 'make proto' and commit the result"; git status --short -- gateway/pb; exit 1; }

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check gateway testkit tests benchmarks models scripts
	$(VENV)/bin/ruff format --check gateway testkit tests benchmarks models scripts
	$(VENV)/bin/mypy gateway testkit tests benchmarks

fmt: $(STAMP_DEV)
	$(VENV)/bin/ruff format gateway testkit tests benchmarks models scripts
	$(VENV)/bin/ruff check --fix gateway testkit tests benchmarks models scripts

models: $(STAMP_DEV)
	$(PY) models/make_demo_models.py

# The batch playbook's inputs (README, "Batch predictions"): three nights, one with the one-hot shift.
demo-data: $(STAMP_RUN)
	$(PY) models/make_demo_data.py var/demo

clean:
	rm -rf $(VENV) $(PROTO_TOOLS) var .pytest_cache .mypy_cache .ruff_cache
