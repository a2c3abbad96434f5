#!/usr/bin/env bash
# Create .venv and install tdmr-ray with its test extra. Idempotent: skips work already done.
# torch/torchvision are installed first at the tested release, so no later step pulls another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
stamp=.venv/.tdmr-installed
want=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
echo "[setup] installing ${TORCH_PINS[*]} ..."
.venv/bin/python -m pip install -q "${TORCH_PINS[@]}" 2>&1 | grep -v '^WARNING: Location' || true
echo "[setup] installing tdmr-ray[test] ..."
# The constraint keeps pip from swapping torch while resolving the other dependencies.
printf '%s\n' "${TORCH_PINS[@]}" > .venv/torch-constraints.txt
.venv/bin/python -m pip install -q -c .venv/torch-constraints.txt -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
# The frost corruption reads the reference's frost textures, shipped as files in the imagecorruptions
# package; --no-deps because its code (and OpenCV) is never used.
.venv/bin/python -m pip install -q --no-deps "imagecorruptions==1.1.2" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch, torchvision, ray, timm, tdmr_ray; print('[setup] torch', torch.__version__, 'ray', ray.__version__)"
echo "$want" > "$stamp"
