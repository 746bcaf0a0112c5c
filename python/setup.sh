#!/usr/bin/env bash
# Sets up the Python environment Nexa's ML runners use, in one command:
#   bash python/setup.sh [REQUIREMENTS]      installs (once) and prints the interpreter
#   export NEXA_PYTHON=$(bash python/setup.sh)
# The venv lives at ${NEXA_VENV_CACHE:-~/.cache/nexa}/venv-<first 16 hex of the
# requirements file's sha256>, so editing the file makes a new one and a second call is
# instant. It is built beside its final name and renamed into place, so an interrupted
# install never leaves a half venv that looks ready.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
req="${1:-$here/requirements.txt}"
cache="${NEXA_VENV_CACHE:-$HOME/.cache/nexa}"
hash="$(sha256sum "$req" | cut -c1-16)"
venv="$cache/venv-$hash"
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$cache"
  # One install at a time (tests start in parallel): the others wait, then find it.
  exec 9>"$cache/.lock-$hash"
  flock 9
fi
if [ ! -x "$venv/bin/python" ]; then
  tmp="$venv.tmp.$$"
  rm -rf "$tmp"
  echo "nexa: installing $(basename "$req") into $venv (PyPI's torch is ~3 GB; minutes)" >&2
  "${PYTHON:-python3}" -m venv "$tmp" >&2
  "$tmp/bin/python" -m pip install -q --disable-pip-version-check --no-input -r "$req" >&2
  # Only bin/python is used (pip is run as python -m pip), and it finds its venv from
  # where it lies, so the renamed venv works.
  mv "$tmp" "$venv"
fi
echo "$venv/bin/python"
