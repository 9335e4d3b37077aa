"""The stages of the demo, each a function of its inputs on disk: model, SFT, pairs, training.

Every stage goes through the project's public pieces, exactly as a user would chain them:
``mpo.model.tiny`` builds the model, ``mpo.train.MPOTrainer`` trains it (SFT is the trainer with
the DPO and BCO weights at 0), and ``data_pipeline`` samples, judges and pairs its responses.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mpo.demo.settings import DemoSettings

DATASET = "shapes"
DESCRIBE_DATASET = "shapes_describe"
# The shapes answers are whole numbers: these modes judge them exactly, and the same modes score
# the held-out evaluation, so "correct" means one thing throughout.
MATCH_MODES = ("exact", "numeric")
# The SFT stage trains the chosen response only (weights 0/0/1), but an MMPR line needs a
# non-empty rejected response; this one is never scored into the loss.
SFT_PLACEHOLDER_REJECTED = "."
# The demo's model is trained from scratch, so it needs no system turn, which would only add
# tokens to every row. SFT, sampling, preference training and evaluation all render with this.
SYSTEM_PROMPT = "none"


@dataclass(frozen=True)
class LossWeights:
    """The MPO objective's weights: DPO (preference), BCO (quality), SFT (generation)."""

    dpo: float
    bco: float
    sft: float


METHODS: dict[str, LossWeights] = {
    "mpo": LossWeights(0.8, 0.2, 1.0),  # the paper's weights
    "dpo": LossWeights(1.0, 0.0, 0.0),  # preference loss alone
    "sft_chosen": LossWeights(0.0, 0.0, 1.0),  # SFT on the chosen responses of the same pairs
}


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# A compact chain-of-thought instruction in the pipeline's v1 answer format ("Final answer: .."):
# the official v1 wording is ~35 tokens, a third of a whole demo sequence, repeated in every row.
SHORT_TEMPLATE = 'Think step by step, then answer as "Final answer: ..".\n{question}'


def prompt_template(name: str):
    """The pipeline template for ``DemoSettings.prompt``: ``v1`` (official wording) or ``short``."""
    from data_pipeline.prompts import get_template

    if name == "short":
        return get_template("custom", SHORT_TEMPLATE, "final_answer")
    return get_template(name)


def cot_prompt(question: str, prompt: str) -> str:
    """The user turn for a raw shapes question, as the pipeline builds it (``<image>`` first)."""
    from data_pipeline.prompts import build_cot_prompt

    return build_cot_prompt(question, 1, prompt_template(prompt))


# The short-answer instruction of the direct targets; the pipeline strips it when it builds a
# chain-of-thought prompt, as the official pipeline does with "Answer with a single word" and kin.
DIRECT_INSTRUCTION = "Answer with a single number."


def direct_prompt(question: str) -> str:
    """The user turn asking for the bare answer (the SFT stage's direct targets)."""
    return f"<image>\n{question}\n{DIRECT_INSTRUCTION}"


def is_cot_item(record_id: str, cot_share: float, seed: int) -> bool:
    """Whether an SFT question gets its chain of thought (else its bare answer): a seeded draw per id."""
    digest = hashlib.sha256(f"cot/{seed}/{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < cot_share * 2**64


def task_records(task_dir: Path, split: str) -> tuple[list[dict], list[dict]]:
    """(checkable questions, describe items) of one split."""
    return read_jsonl(task_dir / f"{split}.jsonl"), read_jsonl(task_dir / f"{split}_describe.jsonl")


def generate_task(task_dir: Path, settings: DemoSettings, seed: int) -> dict:
    """The shapes task of ``settings`` under ``task_dir`` (:func:`mpo.demo.shapes.generate_shapes_task`)."""
    from mpo.demo.shapes import generate_shapes_task

    return generate_shapes_task(task_dir, num_train_images=settings.train_images, num_test_images=settings.test_images,
                                questions_per_image=settings.questions_per_image, seed=seed, image_size=settings.image_size,
                                grid=settings.grid, families=[f for f in settings.families.split(",") if f])


def build_model(task_dir: Path, out_dir: Path, settings: DemoSettings, seed: int) -> Path:
    """A random InternVL whose tokenizer is trained on the train split's prompts and answers.

    Trained on the task's text, the vocabulary holds each word as one token (a few hundred
    tokens in all), so responses are short sequences and the output layer is small.
    """
    from mpo.model.tiny import build_tiny_model

    checkable, describe = task_records(task_dir, "train")
    corpus = [cot_prompt(r["question"], settings.prompt) + "\n" + r["cot"] for r in checkable + describe]
    corpus += [direct_prompt(r["question"]) for r in checkable]
    return build_tiny_model(out_dir, size=settings.model_size, seed=seed, max_patches=1, corpus=corpus)


def write_sft_data(task_dir: Path, out_path: Path, prompt: str, cot_share: float, seed: int) -> dict[str, int]:
    """The SFT set: every describe item (its tallies: perception) and every train question, a
    ``cot_share`` of them with the chain-of-thought prompt and reference chain, the rest with the
    direct prompt and the bare answer (the paper's SFT mix, mostly direct answers).

    Returns the number of lines of each kind (``describe``, ``cot``, ``direct``).
    """
    checkable, describe = task_records(task_dir, "train")
    lines = [{"image": r["image"], "question": cot_prompt(r["question"], prompt), "chosen": r["cot"],
              "rejected": SFT_PLACEHOLDER_REJECTED, "id": r["id"]} for r in describe]
    counts = {"describe": len(lines), "cot": 0, "direct": 0}
    for r in checkable:
        cot = is_cot_item(r["id"], cot_share, seed)
        lines.append({"image": r["image"], "question": cot_prompt(r["question"], prompt) if cot else direct_prompt(r["question"]),
                      "chosen": r["cot"] if cot else r["answer"], "rejected": SFT_PLACEHOLDER_REJECTED, "id": r["id"]})
        counts["cot" if cot else "direct"] += 1
    write_jsonl(out_path, lines)
    return counts


def train(
    model_dir: Path, data: dict, out_dir: Path, weights: LossWeights, steps: int, batch: int,
    lr: float, warmup: float, settings: DemoSettings, seed: int, reference: Path | None = None,
) -> Path:
    """Runs :class:`mpo.train.MPOTrainer` once; returns the saved model (``out_dir/final``).

    Args:
        model_dir: the starting checkpoint (also the frozen reference when one is needed and
            ``reference`` is None).
        reference: another checkpoint as the frozen reference (``reference.name_or_path``).
        data: the recipe's ``data`` section (``jsonl_path``/``image_root`` or ``meta_path``).
        out_dir: the trainer's output directory (``metrics.jsonl`` lands there).
        weights: the loss weights; DPO and BCO at 0 load no reference model.
        warmup: the share of ``steps`` over which the rate rises linearly from 0.
    """
    from mpo.config import recipe_from_dict
    from mpo.train.trainer import MPOTrainer

    recipe = recipe_from_dict({
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {**data, "max_dynamic_patch": 1, "max_length": 512, "system_prompt": SYSTEM_PROMPT},
        "loss": {"beta": settings.beta, "dpo_weight": weights.dpo, "bco_weight": weights.bco,
                 "sft_weight": weights.sft},
        "forward": {"layout": settings.layout},
        "train": {"lr": lr, "vision_lr": lr * settings.vision_lr_scale, "projector_lr": lr * settings.vision_lr_scale,
                  "max_steps": steps, "micro_batch_size": batch, "mixed_precision": "no",
                  "warmup_ratio": warmup, "lr_scheduler": "cosine", "log_every": 1},
        "reference": {"name_or_path": str(reference) if reference else ""},
        "output_dir": str(out_dir),
        # A stage cut short by `mpo demo --resume` runs again in its own directory.
        "resume_from": "latest",
        "seed": seed,
    }, source="mpo demo")
    MPOTrainer(recipe).train()
    return out_dir / "final"


def _pipeline_input(records: list[dict], dataset: str, with_answer: bool) -> list[dict]:
    # Grouped by question family: a batch of one family has responses of similar length, so
    # batched generation wastes fewer steps on rows that have already finished.
    ordered = sorted(records, key=lambda r: r["kind"])
    return [{"id": r["id"], "dataset": dataset, "image": r["image"], "question": r["question"],
             "answer": r["answer"] if with_answer else None} for r in ordered]


def round_slice(records: list[dict], count: int, round_number: int, fresh: bool) -> list[dict]:
    """The ``count`` records a round samples: the first ones, or with ``fresh`` the round's own
    slice (round 1 the first ``count``, round 2 the next, wrapping around); 0: all of them."""
    if not count or count >= len(records):
        return records
    start = (round_number - 1) * count % len(records) if fresh else 0
    return (records + records)[start : start + count]


def build_pairs(model_dir: Path, task_dir: Path, out_dir: Path, settings: DemoSettings, seed: int,
                progress: bool = True, round_number: int = 1) -> dict:
    """Samples a model and builds MMPR pairs with the data pipeline (its Python API).

    Two builds write into one MMPR directory: the checkable train questions (K samples each ->
    correctness and format pairs) and the describe items (one sample each -> Dropout-NTP pairs).
    Round r samples with seed ``seed + r - 1`` (round 1: ``seed``), the questions of
    :func:`round_slice`.

    Returns:
        ``{"meta": path, "subsets": {name: pairs}, "summaries": {build: summary dict}}``.
    """
    from data_pipeline.backends import SamplingParams, TransformersBackend
    from data_pipeline.build import BuildPaths, PairSettings, run_build
    from data_pipeline.dropout_ntp import NTPSettings
    from data_pipeline.records import read_questions
    from data_pipeline.sample import SampleSettings
    from mpo.data.prompting import resolve_system_prompt

    checkable, describe = task_records(task_dir, "train")
    checkable = round_slice(checkable, settings.sample_questions, round_number, settings.fresh_questions)
    builds = [(DATASET, _pipeline_input(checkable, DATASET, True), settings.num_samples)]
    if settings.ntp_questions:
        describe = round_slice(describe, settings.ntp_questions, round_number, settings.fresh_questions)
        builds.append((DESCRIBE_DATASET, _pipeline_input(describe, DESCRIBE_DATASET, False), 1))
    seed = seed + round_number - 1

    backend = TransformersBackend(model_dir, device="cpu", dtype="float32")
    params = SamplingParams(temperature=settings.temperature, top_p=1.0, max_new_tokens=settings.max_new_tokens, max_tiles=1)
    summaries = {}
    for name, lines, num_samples in builds:
        input_path = write_jsonl(out_dir / "inputs" / f"{name}.jsonl", lines)
        questions, bad = read_questions(input_path, name, skip_bad=False)
        summary = run_build(
            questions, bad, task_dir, BuildPaths.of(out_dir, name), backend,
            SampleSettings(prompt_template(settings.prompt), num_samples, params, seed, settings.sample_batch,
                           resolve_system_prompt(SYSTEM_PROMPT)),
            NTPSettings(0.5, 1, params, seed, settings.sample_batch),
            PairSettings(settings.max_pairs, seed),
            modes=MATCH_MODES, threshold=0.9, progress=progress,
        )
        summaries[name] = asdict(summary)
    meta = json.loads((out_dir / "meta.json").read_text())
    return {"meta": str(out_dir / "meta.json"), "subsets": {k: v["length"] for k, v in meta.items()},
            "summaries": summaries}
