"""Chain-of-thought prompts: strip the short-answer instruction, wrap the question in a template.

Two built-in versions follow the official MMPR pipeline (see docs in REFERENCE.md):

* ``v1`` asks for ``Final answer: ..`` after step-by-step reasoning;
* ``v2`` asks for a last line ``Answer: \\boxed{$FINAL_ANSWER}``.

A custom template is any string with one ``{question}``; it names the answer format it asks for
(``final_answer`` or ``boxed``) so the match stage knows how to extract.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mpo.errors import DataError
from mpo.data.prompting import IMAGE_PLACEHOLDER, normalize_question

TEMPLATE_V1 = (
    "Your task is to answer the question below. "
    "Give step by step reasoning before you answer, and when you're ready to answer, "
    'please use the format "Final answer: .."'
    "\n\nQuestion:\n\n{question}"
)

TEMPLATE_V2 = (
    "{question}\n"
    "Answer the preceding question. The last line of your response should follow this format: "
    "'Answer: \\boxed{$FINAL_ANSWER}' (without quotes), where 'FINAL_ANSWER' is your conclusion "
    "based on the reasoning provided. If you are uncertain or the problem is too complex, make "
    "a reasoned guess based on the information provided. Avoid repeating steps indefinitely\u2014"
    "provide your best guess even if unsure. Think step by step logically, considering all "
    "relevant information before answering."
)

ANSWER_FORMATS = ("final_answer", "boxed")

# Instructions that ask for a bare short answer; they contradict a chain-of-thought prompt, so they
# are removed from the end of a question before wrapping it. Matched case-insensitively, with
# flexible whitespace and an optional final period.
_SHORT_ANSWER_INSTRUCTIONS = [
    r"answer the question using a single word or phrase",
    r"answer the question using a single word",
    r"answer using a single word or phrase",
    r"answer with a single word or phrase",
    r"answer with a single word",
    r"answer in a single word",
    r"answer with (?:the|a) single number",
    r"answer with the option'?s letter from the given choices directly",
    r"answer with the letter of the (?:correct )?option(?: directly)?",
    r"answer with the option letter(?: directly)?",
    r"please answer yes or no",
    r"answer yes or no",
    r"answer the question directly",
]
_TRAILING = re.compile(
    r"(?:\s|^)(?:" + "|".join(_SHORT_ANSWER_INSTRUCTIONS) + r")\s*[.!]?\s*$",
    flags=re.IGNORECASE,
)
_LEADING_PLACEHOLDERS = re.compile(r"^\s*(?:<image>\s*)+")


@dataclass(frozen=True)
class PromptTemplate:
    """A CoT template: ``text`` holds ``{question}``; ``answer_format`` says what to extract."""

    name: str
    text: str
    answer_format: str

    def __post_init__(self) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer format must be one of {ANSWER_FORMATS}, got {self.answer_format!r}")
        # Plain substitution, not str.format: templates hold literal braces (\\boxed{}).
        if self.text.count("{question}") != 1:
            raise ValueError(f"template {self.name!r} must contain {{question}} exactly once")

    def fill(self, question: str) -> str:
        return self.text.replace("{question}", question)


BUILTIN_TEMPLATES = {
    "v1": PromptTemplate("v1", TEMPLATE_V1, "final_answer"),
    "v2": PromptTemplate("v2", TEMPLATE_V2, "boxed"),
}


def get_template(version: str, custom_text: str | None = None, answer_format: str | None = None) -> PromptTemplate:
    """Returns a built-in template, or the custom one (``version == "custom"``)."""
    if version == "custom":
        if not custom_text:
            raise ValueError("--prompt custom needs --template (a string with {question})")
        if answer_format is None:
            raise ValueError("--prompt custom needs --answer-format final_answer|boxed")
        return PromptTemplate("custom", custom_text, answer_format)
    if version not in BUILTIN_TEMPLATES:
        raise ValueError(f"unknown prompt version {version!r}; choose v1, v2 or custom")
    return BUILTIN_TEMPLATES[version]


def strip_short_answer_instruction(question: str) -> str:
    """Removes trailing short-answer instructions (repeatedly: some datasets stack two)."""
    previous = None
    while previous != question:
        previous = question
        question = _TRAILING.sub("", question).rstrip()
    return question


def build_cot_prompt(question: str, num_images: int, template: PromptTemplate) -> str:
    """The user turn sent to the model and written to the MMPR ``question`` field.

    Leading ``<image>`` placeholders are lifted out of the question and put before the whole
    instruction (where MMPR puts them); placeholders inside the text (interleaved images) stay
    where they are. A question without placeholders gets one per image, as InternVL does.

    Raises:
        DataError: the question holds placeholders, but not one per image.
    """
    found = question.count(IMAGE_PLACEHOLDER)
    if found not in (0, num_images):
        raise DataError(f"has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s)", field="question")
    leading = _LEADING_PLACEHOLDERS.match(question)
    lifted = leading.group(0).count(IMAGE_PLACEHOLDER) if leading else 0
    body = question[leading.end():] if leading else question
    body = strip_short_answer_instruction(body.strip())
    prompt = template.fill(body)
    if found == 0:
        return normalize_question(prompt, num_images)  # the trainer's placement of absent placeholders
    return f"{IMAGE_PLACEHOLDER}\n" * lifted + prompt


def drop_image_placeholders(prompt: str) -> str:
    """The text-only prompt of Dropout-NTP: every ``<image>`` (and the labels/newlines around leading ones) removed."""
    text = re.sub(r"^(?:\s*(?:Image-\d+:\s*)?<image>\s*)+", "", prompt)
    return text.replace(IMAGE_PLACEHOLDER, "").strip()
