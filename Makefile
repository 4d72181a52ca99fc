# Front door: `make demo` and `make test` each create .venv when missing and install what they need.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch + torchvision first (CUDA build from this machine's disk; runs on CPU), then the package under a
# constraints file that keeps that pair.
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-browser test-labelstudio bench install clean prometheus

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ovdiff demo

# tests/test_metrics.py scrapes the metrics with a real Prometheus: Debian's package, installed when missing (needs
# root and the Debian registry, as test-browser's Chromium does).
prometheus:
	command -v prometheus >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus)

test: $(STAMP) prometheus
	$(BIN)/python -m pytest -q -ra

# The try-it page in headless Chromium (not in `make test`: a fresh machine has no Chromium). Installs Debian's
# chromium when it is missing (needs root and the Debian registry) and playwright-core from tests/browser's lock file.
test-browser: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)
	test -d tests/browser/node_modules/playwright-core || npm ci --prefix tests/browser --no-audit --no-fund
	$(BIN)/python -m pytest -q -ra tests/browser/browser_check.py

# A real Label Studio (PyPI, its own venv .venv-labelstudio; not in `make test`: ~1 GB and a database migration on
# first start) started on 127.0.0.1: a project from label_dataset's labelstudio.xml, tasks.json imported, the Serve
# app connected as its ML backend; what Label Studio stores must decode to the in-process masks.
LSVENV  := .venv-labelstudio
test-labelstudio: $(STAMP)
	test -x $(LSVENV)/bin/label-studio || ($(PY) -m venv $(LSVENV) && $(LSVENV)/bin/pip install -q --upgrade pip && \
		$(LSVENV)/bin/pip install -q -r tests/labelstudio/requirements.txt)
	LABEL_STUDIO_BIN=$(LSVENV)/bin/label-studio $(BIN)/python -m pytest -q -ra -s tests/labelstudio/ls_check.py

bench: $(STAMP)
	@for f in bench/*_bench.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf demo-out .pytest_cache
