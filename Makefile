# pacs-node: `make run` starts the node on its embedded defaults; `make test` runs every test.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip
WHEELS := $(wildcard /opt/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb chromium chromium-driver
STAMP := $(VENV)/.installed

.PHONY: run test lint bench eval apt venv viewer clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, from the CPU build pinned in constraints.txt, before anything depends on it
	$(PIP) install --quiet $(FIND_LINKS) torch==2.13.0
	$(PIP) install --quiet $(FIND_LINKS) -e '.[test,lint]'
	@touch $(STAMP)

venv: $(STAMP)

apt:
	@missing=""; \
	command -v /usr/bin/storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
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

test: apt viewer $(STAMP)
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check pacs_node models tests bench
	$(VENV)/bin/ruff format --check pacs_node models tests bench
	$(VENV)/bin/mypy

# Full held-out and robustness evaluation of the built-in models (writes models/<name>/eval/)
eval: $(STAMP)
	VENV=$(VENV) bash models/eval.sh

# Every benchmark (ingest, inference, end to end); each prints a table and writes bench/results/
bench: apt $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/inference.py
	$(PY) bench/e2e.py

clean:
	rm -rf $(VENV) var .cache .pytest_cache .mypy_cache .ruff_cache
