# cbh: `make` lists the targets. Every target sets up what it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
DEMO_COHORT := data/demo-cohort-src
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PATH := $(CURDIR)/$(BIN):$(PATH)

## help: list the targets
help:
	@grep -E '^## ' $(MAKEFILE_LIST) | sed -E 's/^## ([a-z-]+): /  make \1|/' | column -t -s '|'

## setup: create .venv and install the locked stack and the project (no-op when up to date)
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock requirements-nodeps.lock
	@test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	@echo "installing the locked stack (requirements.lock) into $(VENV) (a few minutes the first time)"
	@$(PY) -m pip install --disable-pip-version-check -q -r requirements.lock 2> >(grep -v '^WARNING: Location' >&2)
	@$(PY) -m pip install --disable-pip-version-check -q --no-deps --require-hashes -r requirements-nodeps.lock 2> >(grep -v '^WARNING: Location' >&2)
	@$(PY) -m pip install --disable-pip-version-check -q --no-deps -e . 2> >(grep -v '^WARNING: Location' >&2)
	@touch $@

## lock: resolve pyproject.toml's ranges (dev extras included) in a scratch venv into requirements.lock
lock:
	@rm -rf .cbh/lockvenv && python3.11 -m venv .cbh/lockvenv
	@.cbh/lockvenv/bin/pip install --disable-pip-version-check -q '.[dev]' 2> >(grep -v '^WARNING: Location' >&2)
	@{ echo "# The exact stack make setup installs: make lock rebuilds it from pyproject.toml's ranges."; \
	   .cbh/lockvenv/bin/pip freeze --exclude-editable | grep -v '^cbh' | sed -E 's/^(torch==[^+]+)\+cpu$$/\1/'; } > requirements.lock
	@rm -rf .cbh/lockvenv
	@echo "requirements.lock: $$(grep -vc '^#' requirements.lock) packages"

## browser: Debian's chromium for the tests that open reports headless (apt; needs root or sudo)
browser:
	@command -v chromium > /dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian's chromium (reports are checked in a headless browser)"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium > /dev/null 2>&1 || { \
	    $$SUDO apt-get update -q > /dev/null && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium > /dev/null; }; }

## postgres: Debian's PostgreSQL server, for the team servers (apt; needs root or sudo)
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl > /dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian's postgresql (the Prefect and MLflow team servers' database)"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql > /dev/null 2>&1 || { \
	    $$SUDO apt-get update -q > /dev/null && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql > /dev/null; }; }

## servers: team servers on 127.0.0.1: PostgreSQL, a Prefect server and an MLflow server on it
servers: setup postgres
	@$(BIN)/cbh servers up

## servers-down: stop the team servers (by PID); their data stays for the next make servers
servers-down: setup
	@$(BIN)/cbh servers down

## demo: synthesise a cohort and run the whole retrain flow on it (ingest .. promote)
demo: setup
	@test -f $(DEMO_COHORT)/annotations.csv || $(BIN)/cbh synth $(DEMO_COHORT)
	@CBH_DEMO=1 $(BIN)/cbh retrain --cohort $(DEMO_COHORT)

## test: the fast test suite (under 10 minutes), two test files at a time (pytest-xdist)
test: setup browser
	$(BIN)/pytest -m "not slow and not servers and not heavy" -q -n 2 --dist loadfile

## test-heavy: what CI runs beside make test: the end-to-end retrain flow and the commands on it, dvc repro
test-heavy: setup
	$(BIN)/pytest -m heavy -q -n 2 --dist loadfile

## test-servers: the team-server and scheduler tests (real PostgreSQL, Prefect, MLflow servers and workers)
test-servers: setup postgres
	$(BIN)/pytest -m servers -q

## test-full: every test, the slow ones and the team servers included
test-full: setup browser postgres
	$(BIN)/pytest -q

## ui: MLflow UI (127.0.0.1:5000) and Prefect UI (127.0.0.1:4200) in the background
ui: setup
	@mkdir -p .cbh
	@nohup $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000 > .cbh/mlflow-ui.log 2>&1 & echo $$! > .cbh/mlflow-ui.pid
	@PREFECT_HOME=$(CURDIR)/.prefect nohup $(BIN)/prefect server start --host 127.0.0.1 --port 4200 > .cbh/prefect-ui.log 2>&1 & echo $$! > .cbh/prefect-ui.pid
	@echo "MLflow UI:  http://127.0.0.1:5000"
	@echo "Prefect UI: http://127.0.0.1:4200"
	@echo "Data Docs:  file://$(CURDIR)/expectations/gx/uncommitted/data_docs/local_site/index.html"
	@echo "stop them with: make ui-down"

## ui-down: stop the UIs started by make ui
ui-down:
	@for f in .cbh/mlflow-ui.pid .cbh/prefect-ui.pid; do test -f $$f && kill $$(cat $$f) 2>/dev/null; rm -f $$f; done; true

## repro: rerun the DVC stages whose inputs changed (dvc repro), then push the data
repro: setup
	dvc repro
	dvc push

## lint: ruff over the code
lint: setup
	$(BIN)/ruff check flows ops pipelines models tests benchmarks scripts

## clean-workspace: delete the demo's data, runs and registry (keeps the code)
clean-workspace:
	rm -rf data mlflow.db mlartifacts .prefect .dvcstore dvc.lock expectations/gx/uncommitted

.PHONY: help setup lock test-heavy browser postgres servers servers-down demo test test-servers test-full ui ui-down repro lint clean-workspace
