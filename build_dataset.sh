#!/usr/bin/env bash
# Build the Kaggle dataset: the vessel_kit wheel (from this checkout), the pinned dependency
# wheels (wheels/requirements-kaggle.txt), the checkpoints, a manifest and dataset-metadata.json.
#
#   ./build_dataset.sh [--checkpoints FILE|RUN_DIR ...] [--out DIR] [--kaggle-id USER/SLUG] [--upload]
#                      [--infer-config infer.yaml] [--no-download] [--python-version 3.11]
#
# Defaults: every runs/*/best.safetensors, out dist/kaggle-dataset. Everything is checked (every
# inference option's name and value, each checkpoint rebuilt, every wheel found) before the folder
# is written and before any upload. The new bundle is staged beside the out folder
# (.<out>.vk-<pid>-<hex>.tmp) and swapped in whole: Ctrl-C or a failure leaves the previous bundle
# as it was; a killed build's staging folder is removed by a later build.
# ./build_dataset.sh --help lists every option (vessel_kit/bundle.py does the work).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export NO_ALBUMENTATIONS_UPDATE=1 VESSEL_KIT_SOURCE="$REPO" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m vessel_kit.bundle "$@"
