#!/usr/bin/env bash
# Set up tekfac on a fresh Debian/Ubuntu machine: the Fashion-MNIST and fortunes (text-gpt's
# corpus) system packages, a virtual environment in .venv, and the package with its development
# requirements (CPU torch 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  sudo_=""; [ "$(id -u)" -ne 0 ] && sudo_="sudo"
  $sudo_ apt-get install -y -q dataset-fashion-mnist \
    || { $sudo_ apt-get update -q && $sudo_ apt-get install -y -q dataset-fashion-mnist; } \
    || echo "setup: could not install dataset-fashion-mnist; pass --data-dir to tekfac bench" >&2
fi
if [ ! -f /usr/share/games/fortunes/cookie ] && command -v apt-get >/dev/null; then
  sudo_=""; [ "$(id -u)" -ne 0 ] && sudo_="sudo"
  $sudo_ apt-get install -y -q fortunes \
    || { $sudo_ apt-get update -q && $sudo_ apt-get install -y -q fortunes; } \
    || echo "setup: could not install fortunes; pass --data-dir to tekfac bench" >&2
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-deps -e .
