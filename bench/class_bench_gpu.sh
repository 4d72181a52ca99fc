#!/usr/bin/env bash
# The class bench on a GPU machine with PyTorch and no network (make bench-gpu-pack packs .cache/wheels first, on a
# machine with network; carry .cache/wheels with the tree). Installs the carried wheels without dependencies or an
# index, builds the random full-size models once, then runs bench/class_bench.py: both paths at N=8 (the host path
# is slow), and the device path alone at the paper's N=64, 30 steps.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
W=.cache/wheels
$PY -m pip install -q --no-deps --no-index "$W"/diffusers-*.whl "$W"/open_clip_torch-*.whl "$W"/ftfy-*.whl \
  "$W"/wcwidth-*.whl "$W"/importlib_metadata-*.whl "$W"/zipp-*.whl 2>&1 | tail -2
$PY -c "import pydensecrf.densecrf" 2>/dev/null || $PY -m pip install -q --no-deps --no-index "$W"/pydensecrf2-*.whl 2>/dev/null \
  || { $PY -m pip install -q --no-deps --no-index "$W"/[cC]ython-*.whl && \
       $PY -m pip install -q --no-deps --no-index --no-build-isolation "$W"/pydensecrf2-*.tar.gz; } 2>&1 | tail -2
CRF=()
$PY -c "import pydensecrf.densecrf" 2>/dev/null || { echo "class_bench_gpu: no pydensecrf here: MaskCut's CRF off"; CRF=(--no-crf); }
$PY -c "import sys, pydensecrf.densecrf; print(sys.version.split()[0], 'pydensecrf ok')" 2>&1 | tail -1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
echo "== random full-size models (SD 1.5, DINO ViT-B/8, CLIP ViT-B/16)"
timeout "${T_BUILD:-170}" $PY -c "import time; t=time.time(); from ovdiff_ray.models.fullsize import fullsize_refs; print(fullsize_refs('.cache/fullsize', 'cuda'), f'{time.time()-t:.0f}s')"
echo "== both paths, N=${N_BOTH:-8}, ${STEPS:-30} steps"
timeout "${T_BOTH:-200}" $PY bench/class_bench.py --recipe paper --n "${N_BOTH:-8}" --steps "${STEPS:-30}" "${CRF[@]}" \
  --maskcut-images 8
echo "== device path alone, N=${N_NEW:-64}, ${STEPS:-30} steps"
timeout "${T_NEW:-180}" $PY bench/class_bench.py --recipe paper --n "${N_NEW:-64}" --steps "${STEPS:-30}" "${CRF[@]}" \
  --no-old --maskcut-images 8
