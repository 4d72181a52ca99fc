#!/usr/bin/env bash
# One prepared check on a lent GPU machine (PyTorch, no network, no Ray), under 10 minutes: the GPU test tier
# (tests/gpu, marker gpu: each path on CUDA against the CPU), the class bench with structured keys (issue 28 point 4)
# and the full-size segmentation bench (point 5); then one table.
#
#   here:   make bench-gpu-pack              # wheels beyond PyTorch into .cache/wheels (network)
#   there:  bash bench/gpu_check.sh          # e.g. the `run` tool with carry [".cache/wheels"]
#
# Steps have their own time limits (env T_*); full logs go to $OUT (or .cache/gpu_check). The random full-size
# models are built once into .cache/fullsize (2.4 GB, kept while the machine stays warm: a rerun skips the build).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OVDIFF_CACHE="$PWD/.cache/ovdiff" OVDIFF_TEST_THREADS="${OVDIFF_TEST_THREADS:-8}"
PY=${PY:-python3}
W=.cache/wheels
LOG=${OUT:-.cache/gpu_check}
mkdir -p "$LOG" "$OVDIFF_CACHE"
t0=$(date +%s)
step() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }

step "install carried wheels"
$PY -m pip install -q --no-deps --no-index "$W"/diffusers-*.whl "$W"/open_clip_torch-*.whl "$W"/ftfy-*.whl \
  "$W"/wcwidth-*.whl "$W"/importlib_metadata-*.whl "$W"/zipp-*.whl 2>&1 | tail -2
$PY -c "import pytest, pytest_timeout" 2>/dev/null || $PY -m pip install -q --no-deps --no-index "$W"/pytest-*.whl \
  "$W"/pluggy-*.whl "$W"/iniconfig-*.whl "$W"/pytest_timeout-*.whl 2>&1 | tail -2
$PY -c "import pycocotools" 2>/dev/null || $PY -m pip install -q --no-deps --no-index "$W"/pycocotools-*.whl 2>&1 | tail -2
$PY -c "import pydensecrf.densecrf" 2>/dev/null || $PY -m pip install -q --no-deps --no-index "$W"/pydensecrf2-*.whl 2>/dev/null \
  || { $PY -m pip install -q --no-deps --no-index "$W"/[cC]ython-*.whl && \
       $PY -m pip install -q --no-deps --no-index --no-build-isolation "$W"/pydensecrf2-*.tar.gz; } 2>&1 | tail -2
CRF=()
$PY -c "import pydensecrf.densecrf" 2>/dev/null || { echo "gpu_check: no pydensecrf here: MaskCut's CRF off"; CRF=(--no-crf); }
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
$PY -c "import ray" 2>/dev/null && echo "gpu_check: note: ray is installed here (the tier does not use it)"

step "random full-size models (SD 1.5, DINO ViT-B/8, CLIP ViT-B/16) -> .cache/fullsize"
timeout "${T_BUILD:-150}" $PY -c "import time; t=time.time(); from ovdiff_ray.models.fullsize import fullsize_refs; print(fullsize_refs('.cache/fullsize', 'cuda'), f'{time.time()-t:.0f}s')" 2>&1 | tail -2

step "GPU tier: pytest -m gpu tests/gpu --device cuda"
timeout "${T_TIER:-180}" $PY -m pytest -q -ra -m gpu tests/gpu --device "${DEVICE:-cuda}" -p no:cacheprovider \
  > "$LOG/tier.log" 2>&1
echo "tier exit $?"; tail -15 "$LOG/tier.log"

step "class bench: paper recipe, N=${N_NEW:-64}, ${STEPS:-30} steps, structured keys, device path"
timeout "${T_CLASS:-130}" $PY bench/class_bench.py --recipe paper --n "${N_NEW:-64}" --steps "${STEPS:-30}" "${CRF[@]}" \
  --keys structured --no-old --maskcut-images 8 > "$LOG/class.log" 2>&1
echo "class bench exit $?"; grep -E '^\||^new\.|^maskcut\.|^summary' "$LOG/class.log"

step "full-size segmentation: paper geometry over an LVIS-size bank"
timeout "${T_SEG:-110}" $PY bench/segment_full.py > "$LOG/segment_full.log" 2>&1
echo "segment_full exit $?"; grep -E '^full\.|^summary' "$LOG/segment_full.log"

step "table"
$PY - "$LOG" <<'EOF'
import re, sys
from pathlib import Path

log = Path(sys.argv[1])
def lines(name):
    p = log / name
    t = p.read_text(errors="replace") if p.exists() else ""
    return dict(re.findall(r"^([\w.]+): (.+)$", t, re.M)), t
tier_v, tier = lines("tier.log")
cls, _ = lines("class.log")
seg, _ = lines("segment_full.log")
m = re.findall(r"(\d+) (passed|failed|error|errors|skipped|deselected)", tier)
counts = {k: int(n) for n, k in m}
def num(d, k):
    try:
        return float(d[k])
    except (KeyError, ValueError):
        return None
rows = [
    ("tier passed / failed / errors", f"{counts.get('passed', 0)} / {counts.get('failed', 0)} / "
     f"{counts.get('error', 0) + counts.get('errors', 0)}", "all pass", counts.get("failed", 0) == 0 and
     counts.get("passed", 0) > 0 and not counts.get("error") and not counts.get("errors")),
    ("class s (paper, structured keys)", cls.get("new.class_s"), "<= 25", (num(cls, "new.class_s") or 1e9) <= 25),
    ("class device busy (kernel time)", cls.get("new.device_busy_share"), ">= 0.85",
     (num(cls, "new.device_busy_share") or 0) >= 0.85),
    ("class host s / image", cls.get("new.host_s_per_image"), "", None),
    ("class CRF masks sent / kept", f"{cls.get('new.crf_masks_sent')} / {cls.get('new.crf_masks_kept')}", "", None),
    ("segment images/s, batch 16", seg.get("full.images_per_s_batch16"), ">= 10",
     (num(seg, "full.images_per_s_batch16") or 0) >= 10),
    ("segment p50 ms, one image", seg.get("full.p50_ms_one_image"), "<= 150",
     (num(seg, "full.p50_ms_one_image") or 1e9) <= 150),
    ("segment device busy, batch 16", seg.get("full.device_busy_share"), ">= 0.85",
     (num(seg, "full.device_busy_share") or 0) >= 0.85),
    ("segment outside forward share", seg.get("full.outside_forward_share"), "<= 0.05",
     (num(seg, "full.outside_forward_share") or 1) <= 0.05),
    ("segment d2h extra MB / image", seg.get("full.d2h_extra_mb_per_image"), "<= 1",
     (num(seg, "full.d2h_extra_mb_per_image") or 1e9) <= 1),
]
print("| check | value | goal | met |")
print("|---|---|---|---|")
for name, value, goal, ok in rows:
    print(f"| {name} | {value if value is not None else 'missing'} | {goal} | "
          f"{'' if ok is None else 'yes' if ok else 'NO'} |")
EOF
step "done (logs in $LOG)"
