"""The answer matcher as a rule reward for online RL engines (TRL's GRPOTrainer, verl).

A response earns 1.0 when its final answer, extracted in the prompt's answer format
(:func:`data_pipeline.extract.extract_answer`), is judged correct against the ground truth by the
matcher that built the preference pairs (:func:`data_pipeline.match.judge`, with the dataset's
modes), else 0.0; an unparsable response earns 0.0 too. So the RL stage rewards exactly what the
pass rates that selected its prompts counted as correct.

Two entry points, one per engine:

* :func:`accuracy_reward`, TRL's ``reward_funcs`` signature: ``f(completions, solution, **kwargs)``.
  TRL passes every other dataset column as a keyword list; ``answer_format`` and ``match_modes``
  (columns of ``mpo-data rl-prompts``' TRL export) pick the extraction and the modes per row.
* :func:`compute_score`, verl's custom reward signature (``reward.custom_reward_function.path``
  = this file or ``pkg://data_pipeline.rewards``, ``name=compute_score``): the row's
  ``extra_info`` (written by the verl export) carries the same settings.

Imports the standard library and this package's matcher only (math-verify lazily, for symbolic
answers), never torch or transformers, so it loads in verl's own environment and in reward
worker processes cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence

from data_pipeline.extract import extract_answer
from data_pipeline.match import CORRECT_THRESHOLD, judge, modes_for_dataset

DEFAULT_ANSWER_FORMAT = "final_answer"


def _truths(ground_truth) -> list[str]:
    """The acceptable answers: a string, or a sequence of them (a list, or the array verl's
    batches hold after reading a parquet list column)."""
    if isinstance(ground_truth, str):
        return [ground_truth]
    if hasattr(ground_truth, "tolist"):
        ground_truth = ground_truth.tolist()
    if isinstance(ground_truth, Sequence) and ground_truth and all(isinstance(x, str) for x in ground_truth):
        return list(ground_truth)
    raise ValueError(f"ground truth must be a string or a non-empty list of strings, got {ground_truth!r}")


def _modes(match_modes, dataset: str | None) -> tuple[str, ...]:
    if match_modes is not None and len(match_modes):
        return tuple(match_modes.tolist() if hasattr(match_modes, "tolist") else match_modes)
    return modes_for_dataset(dataset or "")


def judge_response(response: str, ground_truth, answer_format: str = DEFAULT_ANSWER_FORMAT,
                   match_modes: Sequence[str] | None = None, dataset: str | None = None,
                   threshold: float = CORRECT_THRESHOLD) -> dict:
    """Extracts and judges one response.

    Args:
        response: the model's text.
        ground_truth: the answer, or a list of acceptable answers (any counts).
        answer_format: ``final_answer`` (prompt v1) or ``boxed`` (v2), as the prompt asked.
        match_modes: the match modes; None or empty: those ``--mode auto`` picks for ``dataset``.
        dataset: the dataset name, for ``--mode auto``.
        threshold: correct when the best score is above it.

    Returns:
        ``{"score": 1.0 | 0.0, "acc": same, "parsed": 1.0 | 0.0}``: all floats, so an engine
        can average them as metrics.
    """
    extraction = extract_answer(response, answer_format)
    if not extraction.ok:
        return {"score": 0.0, "acc": 0.0, "parsed": 0.0}
    verdict = judge(extraction.answer, _truths(ground_truth), _modes(match_modes, dataset), threshold)
    value = 1.0 if verdict.correct else 0.0
    return {"score": value, "acc": value, "parsed": 1.0}


def completion_text(completion) -> str:
    """A TRL completion as text: a string, or conversational messages whose content is a string or
    a list of ``{"type": "text", "text": ...}`` parts (the assistant turn's text joined)."""
    if isinstance(completion, str):
        return completion
    pieces = []
    for message in completion:
        content = message["content"]
        if isinstance(content, str):
            pieces.append(content)
        else:
            pieces.extend(part["text"] for part in content if part.get("type") == "text")
    return "".join(pieces)


def accuracy_reward(completions: list, solution: list, answer_format: list[str] | None = None,
                    match_modes: list | None = None, match_threshold: list | None = None, dataset: list[str] | None = None,
                    **kwargs) -> list[float]:
    """TRL ``reward_funcs`` entry: one reward per completion.

    Args:
        completions: strings, or conversational message lists (TRL's two completion forms).
        solution: each row's ground truth (a string or a list of acceptable answers).
        answer_format: each row's answer format (default: ``final_answer`` for every row).
        match_modes: each row's match modes (default: by ``dataset``).
        match_threshold: each row's threshold (default, or where None: the matcher's, 0.9).
        dataset: each row's dataset name.
        **kwargs: TRL's other columns and state (``prompts``, ``trainer_state``, ...): unused.
    """
    rows = len(completions)
    formats = answer_format or [DEFAULT_ANSWER_FORMAT] * rows
    modes = match_modes or [None] * rows
    thresholds = [CORRECT_THRESHOLD if t is None else t for t in (match_threshold or [None] * rows)]
    names = dataset or [None] * rows
    return [judge_response(completion_text(c), truth, fmt, m, name, t)["score"]
            for c, truth, fmt, m, t, name in zip(completions, solution, formats, modes, thresholds, names, strict=True)]


def compute_score(data_source: str, solution_str: str, ground_truth, extra_info: dict | None = None) -> dict:
    """verl custom reward entry (``reward.custom_reward_function.name=compute_score``).

    Args:
        data_source: the row's ``data_source`` (the dataset name; picks the modes when
            ``extra_info`` names none).
        solution_str: the decoded response.
        ground_truth: ``reward_model.ground_truth`` of the row.
        extra_info: the row's ``extra_info``; ``answer_format``, ``match_modes`` and
            ``match_threshold`` are read when present.

    Returns:
        ``{"score", "acc", "parsed"}`` (verl uses ``score`` as the reward and logs the rest).
    """
    info = extra_info or {}
    threshold = info.get("match_threshold")
    return judge_response(solution_str, ground_truth, info.get("answer_format") or DEFAULT_ANSWER_FORMAT,
                          info.get("match_modes"), data_source, CORRECT_THRESHOLD if threshold is None else threshold)
