#!/usr/bin/env bash
# Installs everything the tests need into .venv (the CPU build of PyTorch first, so that pip
# never pulls a multi-GB CUDA build) and Debian's chromium for the page's browser tests, then
# runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "scripts/test.sh: the page's browser tests (tests/e2e/test_page.py) need /usr/bin/chromium;" \
            "install it with 'sudo apt-get install chromium' or run this script as root" >&2
        exit 1
    fi
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
python -m pytest -q "$@"
