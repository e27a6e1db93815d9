# demandstream: the two commands are `make demo` and `make test`. Everything they need is installed
# here, from PyPI (into .venv) and Debian's packages (prometheus), so a clean clone just works.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KAFKA := deploy/kafka/kafka.sh
KAFKA_PORT ?= 9092
PYTEST_ARGS ?=
# make test runs the suite in this many pytest processes (pytest-xdist; 0 = one process). Most of the
# suite's time is workers waiting on paced replays, session timeouts and restarts, not CPU, so two
# processes on two cores halve its wall time. Each process has its own session broker
# (tests/conftest.py); --dist loadscope keeps a module's tests, its module-scoped brokers and fixed
# ports in one process.
TEST_PROCS ?= 2

.PHONY: help venv system-deps test test-quick demo bench lint format kafka-up kafka-down kafka-status clean

help:
	@echo "make demo        run the whole product once: Kafka, model, worker, replay, live signals, summary"
	@echo "make test        install what is missing and run every test (unit, real Kafka, real Prometheus)"
	@echo "make test-quick  unit tests only (no broker)"
	@echo "make bench       measure throughput/latency, regenerate docs/BENCHMARKS.md"
	@echo "make kafka-up / kafka-down / kafka-status   the project's own Kafka 4 broker on 127.0.0.1:$(KAFKA_PORT)"
	@echo "make lint        ruff check + ruff format --check (also run by make test)"

venv: $(STAMP)

# The install (torch with its CUDA libraries) takes about 6 GB; pip's own error on a full disk is easy to
# miss in its output, so say it first when there is clearly not enough room.
VENV_NEEDS_KB := 6500000

# pip's cache makes the second install of torch a copy, not a 5 GB download. Keep pip's byte-compiling:
# where PYTHONDONTWRITEBYTECODE is set (CI here), every worker process would otherwise compile torch.
$(STAMP): pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print $$4}'); if [ -n "$$free" ] && [ "$$free" -lt $(VENV_NEEDS_KB) ]; then \
		echo "warning: $$((free / 1024 / 1024)) GB free here; installing .venv (torch and its CUDA libraries) needs about 6 GB" >&2; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,plots,export]"
	@touch $(STAMP)

# Kafka needs a JDK (17+) and Maven; the Prometheus tests need Debian's prometheus package. That package is
# *unpacked* into a cache (apt-get download + dpkg-deb -x), not installed: installing it would start the
# prometheus and node-exporter services, and the project must not start, stop or kill processes it does not
# own. A prometheus + promtool already on PATH are used as they are.
PROM_DIR := $(HOME)/.cache/demandstream/prometheus
PROM_BIN := $(PROM_DIR)/usr/bin
export PATH := $(PROM_BIN):$(PATH)

system-deps: $(if $(shell command -v prometheus 2>/dev/null),,$(PROM_BIN)/prometheus)
	@command -v java >/dev/null || { echo "error: java (JDK 17+) is required: apt-get install openjdk-17-jdk-headless" >&2; exit 1; }
	@command -v mvn >/dev/null || { echo "error: maven is required: apt-get install maven" >&2; exit 1; }
	@command -v openssl >/dev/null || { echo "error: openssl is required (the TLS tests' client certificate): apt-get install openssl" >&2; exit 1; }
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
		echo "error: prometheus and promtool not found (Debian package prometheus)" >&2; exit 1; }

$(PROM_BIN)/prometheus:
	@echo "unpacking Debian's prometheus package (server + promtool) into $(PROM_DIR)"
	@tmp=$$(mktemp -d) && cd "$$tmp" && \
		{ apt-get download prometheus >/dev/null 2>&1 || { \
			if [ "$$(id -u)" = 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi && \
			apt-get download prometheus >/dev/null 2>&1; }; } && \
		mkdir -p "$(PROM_DIR)" && dpkg-deb -x prometheus_*.deb "$(PROM_DIR)" && rm -rf "$$tmp" || { \
		echo "error: could not fetch Debian's prometheus package (apt-get download prometheus)" >&2; rm -rf "$$tmp"; exit 1; }
	@test -x "$@" && touch "$@"

# Lint first: a tree that ruff rejects fails `make test` (and so CI) before any test runs.
test: venv system-deps lint
	$(PY) -m pytest -n $(TEST_PROCS) --dist loadscope $(PYTEST_ARGS)

test-quick: venv
	$(PY) -m pytest -m "not kafka and not slow and not prometheus" $(PYTEST_ARGS)

demo: venv system-deps
	$(PY) -m demandstream.stream.tools.demo

bench: venv system-deps
	$(VENV)/bin/demandstream bench --out bench.json --markdown docs/BENCHMARKS.md

lint: venv
	$(VENV)/bin/ruff check model stream tests
	$(VENV)/bin/ruff format --check model stream tests

format: venv
	$(VENV)/bin/ruff format model stream tests

kafka-up:
	$(KAFKA) up --port $(KAFKA_PORT)

kafka-down:
	$(KAFKA) down --port $(KAFKA_PORT)

kafka-status:
	$(KAFKA) status --port $(KAFKA_PORT)

clean:
	rm -rf var build *.egg-info .pytest_cache
