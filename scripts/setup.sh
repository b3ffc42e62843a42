#!/usr/bin/env bash
# Create .venv (if missing) and install voiceprint with its test tools into it.
# torch/torchaudio are pinned to 2.9.1 in pyproject.toml (torchaudio pins torch exactly).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3.11 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
