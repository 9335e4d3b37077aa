#!/usr/bin/env bash
# Builds a virtual environment with verl 0.9.1, for the tests that load `mpo-data rl-prompts`'
# verl export with verl's own RLHFDataset and score responses through verl's reward loader. verl
# pins transformers < 5.11 and pulls in ray, hydra and tensordict, so it cannot share the
# project's environment.
#
#   scripts/setup_verl.sh [TARGET]     default TARGET: $MPO_VERL_VENV, else .cache/verl-venv
#
# Idempotent: an environment this version of the script finished is left as it is. The CPU
# machines this project tests on hold torch 2.14.1 / torchvision 0.29.1 as local wheels, which
# pip takes first; elsewhere it downloads them. The project itself is installed without its
# dependencies (editable), so `data_pipeline.rewards` is importable there: verl's
# custom_reward_function.path loads that file by path, and the file imports its siblings.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-${MPO_VERL_VENV:-.cache/verl-venv}}
PYTHON=${PYTHON:-python3}
VERL=verl==0.9.1
# The stamp names this script's version: an environment built by an older one is rebuilt.
STAMP="$TARGET/.mpo-setup-$(sha256sum scripts/setup_verl.sh | cut -c1-12)"

if [ -f "$STAMP" ]; then
    echo "verl environment ready: $TARGET"
    exit 0
fi
start=$(date +%s)
rm -rf "$TARGET"
"$PYTHON" -m venv "$TARGET"
"$TARGET/bin/pip" install --quiet --upgrade pip
# torch first, so verl's own dependencies (accelerate, peft, torchdata) do not pick another build.
"$TARGET/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1
# math-verify: the reward's symbolic matcher; pyarrow and pillow: the export's parquet and images;
# qwen-vl-utils: verl reads a prompt's images with it (an optional dependency of verl's).
"$TARGET/bin/pip" install --quiet "$VERL" math-verify pyarrow pillow qwen-vl-utils
"$TARGET/bin/pip" install --quiet --no-deps -e .
"$TARGET/bin/python" -c "import verl.utils.dataset.rl_dataset, verl.trainer.ppo.reward, data_pipeline.rewards" > /dev/null
touch "$STAMP"
echo "verl environment ready: $TARGET ($(( $(date +%s) - start )) s, $(du -sh "$TARGET" | cut -f1))"
