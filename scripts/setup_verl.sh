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
# pip takes first; elsewhere it downloads them. A cold build takes ~2 min and 6.5 GB here.
# The checkout is put on the environment's path (a .pth file naming it; none of the project's
# dependencies), so `data_pipeline.rewards` imports there: verl's
# reward.custom_reward_function.path loads that file by path (or as pkg://data_pipeline.rewards),
# and it imports its siblings. Move the checkout and the environment must be built again.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=$(realpath -m "${1:-${MPO_VERL_VENV:-.cache/verl-venv}}")
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
SITE=$("$TARGET/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$SITE/mpo_checkout.pth"
# From another directory: the checkout must come from the .pth file, not from the current directory.
(cd / && "$TARGET/bin/python" -c "import verl.utils.dataset.rl_dataset, verl.trainer.ppo.reward, data_pipeline.rewards") > /dev/null
touch "$STAMP"
echo "verl environment ready: $TARGET ($(( $(date +%s) - start )) s, $(du -sh "$TARGET" | cut -f1))"
