#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite: bash scripts/test.sh [pytest args]
# Data and weights come from ../shared (override with TDMR_DATA / TDMR_WEIGHTS).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TDMR_DATA=${TDMR_DATA:-$(cd .. && pwd)/shared/data}
export TDMR_WEIGHTS=${TDMR_WEIGHTS:-$(cd .. && pwd)/shared/weights/cifar10-resnet}
export TDMR_STORAGE=${TDMR_STORAGE:-$(mktemp -d)/storage}
exec .venv/bin/python -m pytest "$@"
