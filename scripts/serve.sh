#!/usr/bin/env bash
# Installs the server into .venv (CPU build of PyTorch unless one is installed) and starts it;
# arguments go to llada-server (default: the built-in demo model on 127.0.0.1:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e .
exec llada-server "$@"
