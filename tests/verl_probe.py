"""Reads ``mpo-data rl-prompts``' verl export with verl's own classes; run by tests/test_rl_verl.py
with the verl environment's python (verl pins a transformers the project's environment cannot hold).

    python tests/verl_probe.py --parquet OUT/verl.parquet --model TINY_DIR --completions c.json --out result.json

1. verl's trainer config (``verl/trainer/config/ppo_trainer.yaml`` composed by hydra, as
   ``python -m verl.trainer.main_ppo`` does) with the overrides a user would pass.
2. ``RLHFDataset`` over the parquet file, with the checkpoint's tokenizer and processor (its
   over-long-prompt filter on, which renders and tiles every prompt); per row the messages it
   hands the rollout, the prompt text the chat template renders from them, the images verl
   decodes (``RLHFDataset._process_multi_modal_info``) and the prompt token ids of verl's rollout
   tokenizer (the Continuous Token builder the agent loop uses).
3. Rewards through verl's reward loop worker (``RewardLoopWorker``: the custom reward function
   loader and the ``naive`` reward manager), once with ``custom_reward_function.path`` as the
   file and once as ``pkg://data_pipeline.rewards``, on the completions given per row.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, AutoProcessor

import verl
from verl import DataProto
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

REWARDS_FILE = Path(__file__).resolve().parents[1] / "data_pipeline" / "rewards.py"
# The README's GSPO settings (InternVL3.5's online stage: sequence-level ratios, no KL), composed
# here so that a key verl 0.9.1 does not have fails the test.
GSPO = [
    "algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.policy_loss.loss_mode=gspo",
    "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean", "actor_rollout_ref.actor.clip_ratio_low=0.0003",
    "actor_rollout_ref.actor.clip_ratio_high=0.0004", "actor_rollout_ref.actor.use_kl_loss=False",
    "algorithm.use_kl_in_reward=False", "actor_rollout_ref.rollout.n=16",
]


def trainer_config(parquet: str, model: str, reward_path: str):
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("ppo_trainer", overrides=[
            f"data.train_files={parquet}", "data.filter_overlong_prompts=True",
            "data.filter_overlong_prompts_workers=1", "data.max_prompt_length=4096",
            f"actor_rollout_ref.model.path={model}",
            f"reward.custom_reward_function.path={reward_path}", "reward.custom_reward_function.name=compute_score",
            *GSPO,
        ])


def read_rows(config, processor) -> tuple[RLHFDataset, list[dict]]:
    dataset = RLHFDataset(data_files=config.data.train_files, tokenizer=processor.tokenizer, config=config.data,
                          processor=processor)
    model_type = AutoConfig.from_pretrained(config.actor_rollout_ref.model.path).model_type
    builder = create_continuous_token_builder(processor.tokenizer, hf_model_type=model_type, processor=processor)
    patch_size = getattr(processor.image_processor, "patch_size", 14)  # what verl's agent loop passes
    rows = []
    for index in range(len(dataset)):
        row = dataset[index]
        messages = row["raw_prompt"]
        images, _, _ = RLHFDataset._process_multi_modal_info(messages, patch_size, config.data)
        rows.append({
            "data_source": row["data_source"], "ability": row["ability"], "reward_model": row["reward_model"],
            "extra_info": row["extra_info"], "index": int(row["index"]),
            "parts": [[part["type"] if isinstance(part, dict) else "str" for part in (m["content"] if isinstance(m["content"], list) else [m["content"]])]
                      for m in messages],
            "rendered": processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
            "image_sizes": [list(image.size) for image in images or []],
            "prompt_ids": list(builder.build_initial_tokens(messages, images=images)),
        })
    return dataset, rows


def score(config, dataset: RLHFDataset, completions: dict[str, list[str]]) -> list[dict]:
    """Scores each row's completions through verl's reward loop worker, as one batch."""
    tokenizer = dataset.tokenizer
    items = [(int(index), text) for index, texts in completions.items() for text in texts]
    batch = DataProto.from_single_dict(collate_fn([dataset[index] for index, _ in items]))
    # The rollout's tensors: a prompt (its ids are not read by the reward), the response ending in
    # the end-of-turn token and right-padded, and the attention mask over both.
    responses = [tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id] for _, text in items]
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(items), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(items), 1 + width), dtype=torch.long)
    mask[:, 0] = 1
    for i, ids in enumerate(responses):
        response_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, 1 : 1 + len(ids)] = 1
    prompts = torch.full((len(items), 1), tokenizer.pad_token_id)
    batch = batch.union(DataProto.from_dict(tensors={"prompts": prompts, "responses": response_ids, "attention_mask": mask}))
    worker = RewardLoopWorker(config)
    results = worker.loop.run_until_complete(worker.compute_score_batch(batch))
    return [{"index": index, "completion": text, "reward_score": r["reward_score"],
             "reward_extra_info": {k: float(v) for k, v in sorted(r["reward_extra_info"].items()) if k in ("score", "acc", "parsed")}}
            for (index, text), r in zip(items, results)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parquet", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--completions", required=True, help='JSON: {"row index": ["completion", ...]}')
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = trainer_config(args.parquet, args.model, str(REWARDS_FILE))
    processor = AutoProcessor.from_pretrained(args.model)
    dataset, rows = read_rows(config, processor)
    completions = json.loads(Path(args.completions).read_text())
    by_file = score(config, dataset, completions)
    by_package = score(trainer_config(args.parquet, args.model, "pkg://data_pipeline.rewards"), dataset, completions)
    result = {"rows": rows, "rewards_file": by_file, "rewards_package": by_package,
              "gspo": {"adv_estimator": config.algorithm.adv_estimator,
                       "loss_mode": config.actor_rollout_ref.actor.policy_loss.loss_mode,
                       "loss_agg_mode": config.actor_rollout_ref.actor.loss_agg_mode,
                       "clip_ratio": [config.actor_rollout_ref.actor.clip_ratio_low, config.actor_rollout_ref.actor.clip_ratio_high],
                       "use_kl_loss": config.actor_rollout_ref.actor.use_kl_loss,
                       "use_kl_in_reward": config.algorithm.use_kl_in_reward, "n": config.actor_rollout_ref.rollout.n}}
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=1, default=str))


if __name__ == "__main__":
    main()
