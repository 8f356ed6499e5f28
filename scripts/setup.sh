#!/usr/bin/env bash
# Create .venv with the engine and its test extras. torch is pinned to the CPU build
# (an unpinned torch would pull a CUDA build of several GB); pass TORCH_SPEC to change it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test]"
# Bytecode for the engine, as a non-editable pip install writes it: a command's start-up then skips compiling the
# modules (the environment may forbid Python to write it on its own, PYTHONDONTWRITEBYTECODE).
python -m compileall -q AgentRegistration >/dev/null
