# Front door: `make demo` and `make test` each create .venv when missing and install what they need.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch + torchvision first (CUDA build from this machine's disk; runs on CPU), then the package under a
# constraints file that keeps that pair.
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-gpu test-browser test-labelstudio bench bench-full bench-gpu-pack bench-gpu gpu-check install clean prometheus

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

# The GPU tier (tests/gpu, marker `gpu`, deselected by `make test`): each path only a GPU reaches, on the device
# against the same call on the CPU, without Ray. Device: DEVICE=cuda|cpu (default cuda when available, else cpu).
# On a lent GPU machine run bench/gpu_check.sh instead (the tier + the benches, one table; see README).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m gpu tests/gpu $(if $(DEVICE),--device $(DEVICE))

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

# Segmentation at full size (paper.yaml's geometry and architectures, random weights, an LVIS-size bank): one image,
# ~10-20 minutes on this 2-core CPU, so not in `make bench`. Builds the random models into .cache/fullsize (2.4 GB).
bench-full: $(STAMP)
	$(BIN)/python bench/segment_full.py --images 1

# The class bench and the GPU tier on a GPU machine without network (issues 19, 28): pack the wheels they need beyond
# PyTorch into .cache/wheels here (network), carry that folder with the tree, then `bash bench/gpu_check.sh` (or
# `make bench-gpu` for bench/class_bench_gpu.sh) there. pytest and pycocotools for the tier (pycocotools as a cp312 wheel, the device's Python). pydensecrf2 ships as this machine's wheel plus its sdist and a pure-Python Cython to build it elsewhere.
GPUWHEELS := .cache/wheels
bench-gpu-pack: $(STAMP)
	mkdir -p $(GPUWHEELS)
	$(BIN)/pip download -q --no-deps -d $(GPUWHEELS) "diffusers==$$($(BIN)/python -c 'import diffusers;print(diffusers.__version__)')" \
		"open_clip_torch==$$($(BIN)/python -c 'import open_clip;print(open_clip.__version__)')" ftfy wcwidth importlib_metadata zipp
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(GPUWHEELS) pydensecrf2
	$(BIN)/pip download -q --no-deps --only-binary=:all: --platform any --implementation py -d $(GPUWHEELS) cython
	$(BIN)/pip wheel -q --no-deps -w $(GPUWHEELS) pydensecrf2 || true
	$(BIN)/pip download -q --no-deps -d $(GPUWHEELS) pytest pluggy iniconfig pytest-timeout
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		-d $(GPUWHEELS) pycocotools
	du -sh $(GPUWHEELS)

bench-gpu:
	bash bench/class_bench_gpu.sh

# The GPU tier + the class bench (structured keys) + the full-size segmentation bench on a lent GPU machine, one table.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf demo-out .pytest_cache
