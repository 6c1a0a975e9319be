#!/usr/bin/env bash
# Installs everything the tests need into .venv (the CPU build of PyTorch first, so that pip
# never pulls a multi-GB CUDA build), then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
python -m pytest -q "$@"
