# pacs-node: `make run` starts the node on its embedded defaults; `make test` runs every test.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip
WHEELS := $(wildcard /opt/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb chromium chromium-driver invesalius-examples redis-server
STAMP := $(VENV)/.installed
# The real FHIR R4 server of the EHR tests, in a venv of its own (its pins must not touch ours)
FHIR_VENV ?= .venv-fhir
SEKMET_VERSION ?= 0.1.1
FHIR_STAMP := $(FHIR_VENV)/.installed
# Long runs: seconds of fuzzing, rounds of chaos, minutes of soak
FUZZ_S ?= 1800
CHAOS_ROUNDS ?= 25
SOAK_MIN ?= 10
# pytest-xdist workers of `make test`, each taking whole test files (module fixtures stay shared)
TEST_WORKERS ?= 2
# Examples per API operation of the long schemathesis run
SCHEMATHESIS_EXAMPLES ?= 200

.PHONY: run test lint bench eval apt venv viewer fhir-server fuzz soak chaos schemathesis clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, from the CPU build pinned in constraints.txt, before anything depends on it
	$(PIP) install --quiet $(FIND_LINKS) torch==2.13.0
	$(PIP) install --quiet $(FIND_LINKS) -e '.[test,lint]'
	@touch $(STAMP)

venv: $(STAMP)

# Installs sekmet-fhir and proves its command runs; fails (and so fails `make test`) when it cannot.
$(FHIR_STAMP):
	@test -x $(FHIR_VENV)/bin/python || python3 -m venv $(FHIR_VENV)
	$(FHIR_VENV)/bin/python -m pip install --quiet sekmet-fhir==$(SEKMET_VERSION)
	$(FHIR_VENV)/bin/sekmet --help >/dev/null
	@touch $(FHIR_STAMP)

fhir-server: $(FHIR_STAMP)

apt:
	@missing=""; \
	command -v /usr/bin/storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	test -e /usr/share/doc/invesalius-examples/examples/Cranium.inv3 || missing="$$missing invesalius-examples"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

run: $(STAMP)
	$(VENV)/bin/pacs-node serve

# OHIF (the radiologists' viewer in the browser test), unpacked once under .cache/
viewer:
	bash tests/viewer/setup.sh

test: apt viewer $(STAMP) $(FHIR_STAMP)
	PACS_NODE_FHIR_VENV=$(abspath $(FHIR_VENV)) $(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile

# The long versions of the fuzzing, chaos, soak and schemathesis runs that `make test` runs briefly
fuzz: apt $(STAMP)
	PACS_NODE_TEST_FUZZ_S=$(FUZZ_S) $(VENV)/bin/pytest -p no:cacheprovider tests/integration/test_fuzz_scp.py

chaos: apt $(STAMP) $(FHIR_STAMP)
	PACS_NODE_TEST_CHAOS_ROUNDS=$(CHAOS_ROUNDS) PACS_NODE_FHIR_VENV=$(abspath $(FHIR_VENV)) \
		$(VENV)/bin/pytest tests/integration/test_chaos.py tests/integration/test_crash.py \
		tests/integration/test_crash_delivery.py

soak: apt $(STAMP)
	$(PY) bench/soak.py --minutes $(SOAK_MIN)

# The JSON API against its OpenAPI document: every phase, many examples per operation
schemathesis: $(STAMP)
	PACS_NODE_TEST_SCHEMATHESIS_EXAMPLES=$(SCHEMATHESIS_EXAMPLES) \
		PACS_NODE_TEST_SCHEMATHESIS_PHASES=examples,coverage,fuzzing,stateful \
		$(VENV)/bin/pytest -p no:cacheprovider tests/integration/test_api_schemathesis.py

lint: $(STAMP)
	$(VENV)/bin/ruff check pacs_node models tests bench
	$(VENV)/bin/ruff format --check pacs_node models tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Full held-out and robustness evaluation of the built-in models (writes models/<name>/eval/)
eval: $(STAMP)
	VENV=$(VENV) bash models/eval.sh

# Every benchmark (ingest, inference, end to end); each prints a table and writes bench/results/
bench: apt $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/inference.py
	$(PY) bench/e2e.py

clean:
	rm -rf $(VENV) $(FHIR_VENV) var .cache .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
