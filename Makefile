# Front door: `make demo` and `make test` each create .venv when missing and install what they need.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch + torchvision first (CUDA build from this machine's disk; runs on CPU), then the package under a
# constraints file that keeps that pair.
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-browser test-labelstudio bench bench-gpu-pack bench-gpu install clean prometheus

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

# The try-it page and the demo's results page in headless Chromium (not in `make test`: a fresh machine has no
# Chromium). Installs Debian's chromium when it is missing (needs root and the Debian registry) and playwright-core
# from tests/browser's lock file.
test-browser: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)
	test -d tests/browser/node_modules/playwright-core || npm ci --prefix tests/browser --no-audit --no-fund
	$(BIN)/python -m pytest -q -ra tests/browser/browser_check.py tests/browser/results_check.py

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

# The class bench on a GPU machine without network (issue 19): pack the wheels it needs beyond PyTorch into
# .cache/wheels here (network), carry that folder with the tree, then `make bench-gpu` (or bench/class_bench_gpu.sh)
# there. pydensecrf2 ships as this machine's wheel plus its sdist and a pure-Python Cython to build it elsewhere.
GPUWHEELS := .cache/wheels
bench-gpu-pack: $(STAMP)
	mkdir -p $(GPUWHEELS)
	$(BIN)/pip download -q --no-deps -d $(GPUWHEELS) "diffusers==$$($(BIN)/python -c 'import diffusers;print(diffusers.__version__)')" \
		"open_clip_torch==$$($(BIN)/python -c 'import open_clip;print(open_clip.__version__)')" ftfy wcwidth importlib_metadata zipp
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(GPUWHEELS) pydensecrf2
	$(BIN)/pip download -q --no-deps --only-binary=:all: --platform any --implementation py -d $(GPUWHEELS) cython
	$(BIN)/pip wheel -q --no-deps -w $(GPUWHEELS) pydensecrf2 || true
	du -sh $(GPUWHEELS)

bench-gpu:
	bash bench/class_bench_gpu.sh

clean:
	rm -rf demo-out .pytest_cache
