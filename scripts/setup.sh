#!/usr/bin/env bash
# Create .venv (if missing) and install voiceprint with its test tools into it.
# torch/torchaudio are pinned to 2.9.1 in pyproject.toml (torchaudio pins torch exactly).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3.11 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The distribution used to be called "voiceprint" (a name taken on PyPI by an unrelated
# project); an older checkout's install under that name would own the same `voiceprint`
# command, so it goes before the install under today's name.
if .venv/bin/python -m pip show --quiet voiceprint > /dev/null 2>&1; then
  .venv/bin/python -m pip uninstall --quiet --yes voiceprint
fi
# The editable install maps the package `voiceprint` onto the repository root through an
# import hook, which setuptools announces with a UserWarning box on every install; the
# advice in it (no folder named voiceprint in the working directory) holds here.
PYTHONWARNINGS=ignore::UserWarning .venv/bin/python -m pip install --quiet -e '.[test]'
