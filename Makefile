# Tollgate's two commands: `make demo` (the offline quick start) and `make test` (everything
# CI checks). Both create .venv with the project and its dev tools on first use; only a
# Python 3.11+ interpreter is needed on the machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench protos envoy-configs clean chromium

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Tollgate needs Python 3.11+, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# xds-protos ships an old copy of opentelemetry/proto that, installed last, shadows
	@# opentelemetry-proto's (ADR 010): put opentelemetry-proto's files back.
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tollgate demo

test: lint typecheck chromium
	$(BIN)/pytest -q

# The browser tests drive Debian's Chromium (Playwright's own browser download is not used).
chromium:
	@test -x /usr/bin/chromium || { \
		echo "installing chromium with apt-get (for the dashboard's browser tests)"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }; }

lint: $(STAMP)
	$(BIN)/ruff format --check src tests scripts bench
	$(BIN)/ruff check src tests scripts bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python bench/run.py

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

envoy-configs: $(STAMP)
	for target in local compose kubernetes; do \
		$(BIN)/tollgate envoy-config --target $$target -o envoy/envoy-$$target.yaml; done
	cp envoy/envoy-kubernetes.yaml deploy/kubernetes/base/envoy-kubernetes.yaml

clean:
	rm -rf $(VENV) .tollgate .mypy_cache .ruff_cache .pytest_cache
