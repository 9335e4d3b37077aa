"""The ``mpo iterate`` config: a training recipe plus an ``iterate:`` section.

One YAML file holds both. ``iterate:`` (:class:`IterateConfig`, its keys documented below and in
``mpo iterate --help``) says what to sample, how to pair and judge, where to sample and how many
rounds; the rest is an ordinary recipe (``mpo train --help``) that every round trains with, its
``model.name_or_path`` the starting policy (round 0) and its ``output_dir`` the iteration's folder.
Each round fills in what changes: ``model.name_or_path`` (the previous round's model),
``data.meta_path`` (the round's pairs), ``reference.name_or_path`` (with ``reference: initial``),
``output_dir`` (``round-k/train``) and ``resume_from``; a recipe that sets one of the data paths
or ``resume_from`` itself is refused.

Everything is checked before any model loads: unknown keys (with the valid ones listed), types,
the round recipe (built for round 1 and validated like ``mpo train``'s), the questions files and
the sampler's executable.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from mpo.config import Recipe, read_recipe_yaml, recipe_from_dict, section_from_dict, with_overrides
from mpo.errors import DataError

SECTION = "iterate"
SET_PER_ROUND = ("data.meta_path", "data.jsonl_path", "data.dataset_path", "resume_from", "reference.name_or_path",
                 "reference.precomputed_path")
"""Recipe keys each round sets (its pairs, its reference by ``iterate.reference``, its resume); a
config that sets one is refused rather than overridden, or left to override the iteration's choice."""
VLLM_VENV_ENV = "MPO_VLLM_VENV"
"""The environment variable naming the virtual environment vLLM is installed in (its own: vLLM
pins its own torch and transformers; ``scripts/setup_vllm.sh`` builds one)."""


@dataclass
class IterateConfig:
    """The ``iterate:`` section: rounds, questions, sampling, matching and pairs."""

    rounds: int = 2
    """Rounds to run; ``--rounds N`` overrides it, and a finished run resumed with more rounds
    goes on from its last one."""
    reference: Literal["previous", "initial"] = "previous"
    """The frozen reference of round k: ``previous``, the round k-1 model each round starts from
    (iterative DPO's rule), or ``initial``, the starting model in every round."""
    questions: str = ""
    """The questions to sample (required): an ``mpo-data`` input JSONL, one line per question:
    ``image`` or ``images``, ``question``, ``answer`` (its ground truth), optional ``id`` and
    ``dataset``. A line without ``answer`` is continued without its image (Dropout-NTP pairs)."""
    image_root: str = ""
    """The directory the questions' image paths are relative to (default: the questions file's)."""
    questions_per_round: int = 0
    """Questions sampled per round: 0, all of them every round; N, round k samples the k-th
    slice of N questions (wrapping around), so each round sees questions the last did not."""
    eval_questions: str = ""
    """Held-out questions with ground truths (the same format), answered greedily by the starting
    model and after every round: the table's held-out accuracy. Empty: no such evaluation (the
    trainer's ``data.eval_fraction`` metrics still appear)."""
    eval_image_root: str = ""
    """The directory of ``eval_questions``' images (default: its file's directory)."""
    eval_max_new_tokens: int = 0
    """Longest greedy answer of the evaluation (0: ``max_new_tokens``)."""

    sampler: Literal["vllm", "transformers", "server"] = "vllm"
    """Where the samples come from. ``vllm``: a vLLM OpenAI server this command starts on the
    latest checkpoint (``vllm_python -m vllm.entrypoints.openai.api_server --model CKPT`` plus
    ``server_args``, on 127.0.0.1), kept for the round's evaluation and the next round's sampling
    and stopped by its process ID before training; ``server``: the same with ``server_command``
    (SGLang, LMDeploy, vLLM under srun, ``mpo-data serve``); ``transformers``: the checkpoint in
    this process."""
    vllm_python: str = ""
    """The Python of vLLM's environment (empty: ``$MPO_VLLM_VENV/bin/python`` when that is set,
    else this Python). The server does not get this run's ``PYTHONPATH``, which would shadow its
    environment's packages."""
    server_args: list[str] = field(default_factory=list)
    """Further arguments of the vLLM server, e.g. ``[--tensor-parallel-size, "8"]`` or, on CPU,
    ``[--dtype, float32, --max-model-len, "2048", --enforce-eager, --trust-request-mm-kwargs]``
    (``--trust-request-mm-kwargs`` is needed for the per-request tile budget)."""
    server_command: list[str] = field(default_factory=list)
    """With ``sampler: server``: the command that serves a checkpoint, with ``{model}`` (its
    absolute path, also the name it must be served under) and ``{port}`` (a free loopback port)
    in its arguments, e.g. ``[python, -m, sglang.launch_server, --model-path, "{model}",
    --served-model-name, "{model}", --port, "{port}"]``. It must answer ``GET /v1/models`` on
    127.0.0.1 once ready."""
    server_timeout: float = 900.0
    """Seconds a started server may take to answer before the run stops with its log's tail."""
    concurrency: int = 8
    """Requests in flight to the server."""
    request_timeout: float = 600.0
    """Seconds per request to the server."""
    device: str = "auto"
    """``sampler: transformers``: the device (auto: CUDA when there is one)."""

    num_samples: int = 8
    """Responses sampled per question (K)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Top-k cut (0: none)."""
    max_new_tokens: int = 1024
    """Longest response, in tokens."""
    max_tiles: int = 6
    """Tile budget per question (InternVL's ``max_dynamic_patch``), written into meta.json."""
    batch_size: int = 0
    """Questions per generate call (0: 4 for ``transformers``, 2 x ``concurrency`` for a server)."""
    prompt: Literal["v1", "v2", "custom"] = "v1"
    """The chain-of-thought instruction: the official ``v1`` / ``v2`` wording, or ``template``."""
    template: str = ""
    """With ``prompt: custom``: the instruction, containing ``{question}``."""
    answer_format: Literal["", "final_answer", "boxed"] = ""
    """With ``prompt: custom``: how the answer is written (``Final answer: ..`` or ``\\boxed{}``)."""
    system_prompt: str = "auto"
    """The system message sampled with and trained with: ``auto`` (InternVL2.5/3's default),
    ``none``, or the text."""
    match_modes: str = "auto"
    """How answers are judged: ``auto`` (per dataset name) or a comma list of modes (``exact``,
    ``numeric``, ``relaxed``, ``math``, ``vqa``, ``anls``, ...)."""
    match_threshold: float = 0.9
    """A response is correct when its best score is above this."""
    max_pairs: int = 15
    """Pairs kept per question and subset."""
    answer_fix: bool = False
    """Rewrite the chosen response's final answer to the ground truth."""
    ntp_ratio: float = 0.5
    """Dropout-NTP: the share of the chosen response's words kept before the continuation."""
    ntp_pairs_per_question: int = 1
    """Dropout-NTP continuations per question without an answer."""


@dataclass(frozen=True)
class IterateSetup:
    """A checked ``mpo iterate`` config: the section, the per-round recipe and where it came from."""

    config: IterateConfig
    recipe: dict
    """The recipe part of the YAML (overrides applied); :func:`round_recipe` completes it."""
    source: str

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.get("output_dir") or Recipe().output_dir)

    @property
    def seed(self) -> int:
        """The recipe's seed; round k samples with ``seed + k - 1``."""
        return self.recipe.get("seed", Recipe().seed)

    @property
    def initial_model(self) -> str:
        return self.recipe["model"]["name_or_path"]

    def to_yaml(self) -> str:
        """The resolved config (the section and the recipe), as ``mpo iterate`` reads it back."""
        return yaml.safe_dump({SECTION: asdict(self.config), **self.recipe}, sort_keys=False, allow_unicode=True)


def round_recipe(setup: IterateSetup, number: int, start: str, pairs_meta: Path, resume: bool) -> Recipe:
    """The recipe of round ``number``: from ``start`` on ``pairs_meta``, into ``round-k/train``.

    Args:
        setup: the checked config.
        number: the round (1 for the first).
        start: the model the round starts from (the starting model in round 1).
        pairs_meta: the round's ``meta.json``.
        resume: continue the round's training from its latest checkpoint.
    """
    data = {**setup.recipe}
    data["model"] = {**data.get("model", {}), "name_or_path": start}
    data["data"] = {**data.get("data", {}), "meta_path": str(pairs_meta)}
    reference = dict(data.get("reference", {}))
    if setup.config.reference == "initial" and number > 1:
        reference["name_or_path"] = setup.initial_model
    data["reference"] = reference
    data["output_dir"] = str(round_dir(setup.output_dir, number) / "train")
    data["resume_from"] = "latest" if resume else ""
    return recipe_from_dict(data, source=f"{setup.source} (round {number})")


def round_dir(output_dir: Path, number: int) -> Path:
    """``output_dir/round-k``; round 0 holds the starting model's evaluation."""
    return output_dir / f"round-{number}"


def load_iterate(path: str | os.PathLike, overrides: list[str] | None = None, rounds: int | None = None) -> IterateSetup:
    """Reads and checks an ``mpo iterate`` config (no model is loaded).

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` (``iterate.num_samples=4``, ``train.lr=1e-6``).
        rounds: ``--rounds``, over ``iterate.rounds``.
    """
    source = str(path)
    data = with_overrides(read_recipe_yaml(path), overrides)
    section = data.pop(SECTION, None)
    if not isinstance(section, dict):
        raise DataError(f"needs an `{SECTION}:` section (mpo iterate --help lists its keys)", file=source)
    config = section_from_dict(IterateConfig, section, SECTION + ".", source)
    if rounds is not None:
        config.rounds = rounds
    for dotted in SET_PER_ROUND:
        section_name, _, key = dotted.rpartition(".")
        holder = data.get(section_name, {}) if section_name else data
        if isinstance(holder, dict) and holder.get(key):
            raise DataError(f"is set by mpo iterate for each round; remove it from the config", file=source, field=dotted)
    if not (data.get("model") or {}).get("name_or_path"):
        raise DataError("the starting policy is required", file=source, field="model.name_or_path")
    setup = IterateSetup(config, data, source)
    _check(setup)
    first = round_recipe(setup, 1, setup.initial_model, round_dir(setup.output_dir, 1) / "pairs" / "meta.json", False)
    if first.model.lora.enabled:
        # Round k+1 samples and trains from round k's final/, which a LoRA run writes as an adapter
        # that neither the servers nor model.name_or_path load; refused here, not after round 1.
        raise DataError("mpo iterate trains full models (each round's final/ is the next round's model and sampler); "
                        "set model.lora.enabled: false", file=source, field="model.lora.enabled")
    return setup


def _check(setup: IterateSetup) -> None:
    """The section's own rules, and the files it names."""
    config, source = setup.config, setup.source

    def refuse(key: str, message: str) -> None:
        raise DataError(message, file=source, field=f"{SECTION}.{key}")

    if config.rounds < 1:
        refuse("rounds", f"must be at least 1, got {config.rounds}")
    if config.num_samples < 2:
        refuse("num_samples", f"must be at least 2 (a pair needs a right and a wrong response), got {config.num_samples}")
    for key in ("max_new_tokens", "max_tiles", "max_pairs", "concurrency", "ntp_pairs_per_question"):
        if getattr(config, key) < 1:
            refuse(key, f"must be at least 1, got {getattr(config, key)}")
    for key in ("questions_per_round", "batch_size", "eval_max_new_tokens", "top_k"):
        if getattr(config, key) < 0:
            refuse(key, f"must be >= 0, got {getattr(config, key)}")
    if config.temperature <= 0:
        refuse("temperature", f"must be above 0 (pairs need different responses), got {config.temperature}")
    if not 0 < config.top_p <= 1:
        refuse("top_p", f"must be in (0, 1], got {config.top_p}")
    if not 0 < config.ntp_ratio < 1:
        refuse("ntp_ratio", f"must be in (0, 1), got {config.ntp_ratio}")
    if config.server_timeout <= 0 or config.request_timeout <= 0:
        refuse("server_timeout" if config.server_timeout <= 0 else "request_timeout", "must be above 0")
    if not config.questions:
        refuse("questions", "is required: the questions to sample each round (an mpo-data input JSONL)")
    for key in ("questions", "eval_questions"):
        if getattr(config, key) and not Path(getattr(config, key)).is_file():
            refuse(key, f"no such file: {getattr(config, key)}")
    try:
        from data_pipeline.match import parse_modes
        from data_pipeline.prompts import get_template

        get_template(config.prompt, config.template or None, config.answer_format or None)
        parse_modes(config.match_modes)
    except ValueError as error:
        refuse("prompt" if "prompt" in str(error) else "match_modes", str(error))
    if config.sampler == "vllm" and not Path(vllm_python(config)).exists():
        refuse("vllm_python", f"no Python at {vllm_python(config)}: build vLLM's environment with scripts/setup_vllm.sh "
                              f"and set ${VLLM_VENV_ENV} or {SECTION}.vllm_python")
    if config.sampler == "server":
        text = " ".join(config.server_command)
        if "{model}" not in text or "{port}" not in text:
            refuse("server_command", "needs {model} and {port} among its arguments (sampler: server)")
    elif config.server_command:
        refuse("server_command", f"is read with sampler: server only (this config's sampler is {config.sampler})")


def vllm_python(config: IterateConfig) -> str:
    """The interpreter that runs vLLM's server (:attr:`IterateConfig.vllm_python`)."""
    if config.vllm_python:
        return config.vllm_python
    venv = os.environ.get(VLLM_VENV_ENV)
    return str(Path(venv) / "bin" / "python") if venv else sys.executable
