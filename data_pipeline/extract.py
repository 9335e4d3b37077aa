"""Final-answer extraction with each prompt version's format checks.

A response that fails the checks is *unparsable*: it joins the format-negative set (rejected in
the ``_pairs_vqa_format_rules`` subset) instead of being judged right or wrong.

* ``final_answer`` (prompt v1): the last answer trigger, at most two of them in the response, a
  non-empty rationale before the last one, and a non-empty single-line answer after it. The
  triggers are the official pipeline's, tried in order, the first found being the response's:
  ``Final answer:``, ``Final Answer:``, then the Chinese prompt's ``答案:``, also with the
  full-width colon ``答案：`` its answers often use (``最终答案：`` ends in it too). Other
  phrasings and languages (``final answer:``, ``Réponse finale :``) are unparsable.
  (The official code further asks for two line breaks in the response; a one-line rationale is
  accepted here.)
* ``boxed`` (prompt v2, and the Chinese ``答案：\\boxed{}`` variant): the content of the last
  ``\\boxed{...}``, braces balanced, non-empty, without a ``\\text{}``-like wrapper around all of
  it: v2 answers often box a letter or a word as ``\\boxed{\\text{B}}`` or ``\\boxed{\\textbf{B}}``,
  and the answer is ``B`` (the answer fix then rewrites the ``B`` inside the wrapper).
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.answer_text import TEXT_WRAPPERS, unwrap_span

MAX_TRIGGERS = 2  # more than two "Final answer:" means the model looped; the official rule
ANSWER_TRIGGERS = ("Final answer:", "Final Answer:", "答案:", "答案：")


@dataclass(frozen=True)
class Extraction:
    """The extracted answer and where it sits in the response (for the answer fix), or why not.

    ``start``/``end`` index ``response[start:end] == answer`` when ``answer`` is not None.
    """

    answer: str | None
    error: str | None = None
    start: int = -1
    end: int = -1

    @property
    def ok(self) -> bool:
        return self.answer is not None


def _strip_span(text: str, start: int, end: int, chars: str) -> tuple[int, int]:
    while start < end and text[start] in chars:
        start += 1
    while end > start and text[end - 1] in chars:
        end -= 1
    return start, end


def extract_final_answer(response: str) -> Extraction:
    """Prompt v1: ``... rationale ... Final answer: X`` (or a trigger of :data:`ANSWER_TRIGGERS`)."""
    trigger = next((t for t in ANSWER_TRIGGERS if t in response), None)
    if trigger is None:
        return Extraction(None, "no answer trigger ('Final answer:' or '答案:')")
    count = response.count(trigger)
    if count > MAX_TRIGGERS:
        return Extraction(None, f"{count} {trigger!r} triggers (at most {MAX_TRIGGERS})")
    position = response.rfind(trigger)
    # Markdown bold around the trigger ("**Final answer:** X") is formatting, not rationale/answer.
    rationale = response[:position].rstrip().rstrip("*")
    if not rationale.strip():
        return Extraction(None, f"no rationale before {trigger!r}")
    start, end = _strip_span(response, position + len(trigger), len(response), " \t\r\n*")
    answer = response[start:end]
    if not answer:
        return Extraction(None, f"empty answer after {trigger!r}")
    if "\n" in answer:
        return Extraction(None, f"answer after {trigger!r} spans several lines")
    return Extraction(answer, None, start, end)


def extract_boxed(response: str) -> Extraction:
    """Prompt v2: the content of the last ``\\boxed{...}`` (nested braces allowed)."""
    opener = "\\boxed{"
    position = response.rfind(opener)
    if position == -1:
        return Extraction(None, "no \\boxed{}")
    depth, index = 1, position + len(opener)
    while index < len(response):
        char = response[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                break
        index += 1
    if depth != 0:
        return Extraction(None, "unbalanced braces in \\boxed{")
    start, end = unwrap_span(response, position + len(opener), index, TEXT_WRAPPERS)
    if start == end:
        return Extraction(None, "empty \\boxed{}")
    return Extraction(response[start:end], None, start, end)


def extract_answer(response: str, answer_format: str) -> Extraction:
    if answer_format == "final_answer":
        return extract_final_answer(response)
    if answer_format == "boxed":
        return extract_boxed(response)
    raise ValueError(f"unknown answer format {answer_format!r}")


def fix_answer(response: str, extraction: Extraction, answer: str) -> str:
    """The "answer fix": the chosen response with its final answer rewritten to the ground truth.

    A correct response may say ``12 cm`` or ``(B) blue`` where the label is ``12`` or ``B``; the
    fix trains the model towards the dataset's exact answer string.
    """
    if not extraction.ok:
        raise ValueError("cannot fix an unparsable response")
    return response[: extraction.start] + answer + response[extraction.end :]
