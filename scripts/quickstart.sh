#!/usr/bin/env bash
# Set up .venv (if needed) and run the main job end to end on a local Ray instance and local disk.
# Data and weights come from ../shared unless TDMR_DATA / TDMR_WEIGHTS say otherwise; extra
# arguments go to the job (e.g. --preset full).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TDMR_DATA=${TDMR_DATA:-$(cd .. && pwd)/shared/data}
export TDMR_WEIGHTS=${TDMR_WEIGHTS:-$(cd .. && pwd)/shared/weights/cifar10-resnet}
exec .venv/bin/python jobs/cema.py --preset quick "$@"
