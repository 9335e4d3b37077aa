"""The demo's knobs in one dataclass, with the two presets ``mpo demo`` ships.

``default`` is the best design measured (README, "The demo", has its 3-seed accuracies and
minutes per seed); ``quick`` runs every stage on a few questions in well under a minute for tests
(its accuracies mean nothing). Any field can be overridden on the command line: ``mpo demo --set sft_steps=200``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import yaml


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides a demo run, besides the seed (all of it goes into report.md)."""

    # -- the task (mpo.demo.shapes)
    train_images: int = 2400
    """Train images; each gives ``questions_per_image`` checkable questions and one describe item.
    Images are cheap and a step costs the same whatever the set's size: with 300 images the model
    learned the answers' prior and not to read the picture (measured), with 2400 it reads them."""
    test_images: int = 200
    """Held-out images (their questions are the evaluation set: 400 at the default)."""
    questions_per_image: int = 2
    image_size: int = 64
    """One 64-px tile per image: 16 image tokens for the demo model."""
    families: str = ""
    """Comma-separated question families (``mpo.demo.shapes``); empty: all six."""
    grid: int = 4
    """Shapes centred in cells of a 4 x 4 grid, one cell per image token (0: anywhere)."""

    # -- the model (mpo.model.tiny)
    model_size: str = "small"
    """A size of ``mpo.tiny_model.SIZES``; the tokenizer is trained on the task's text."""

    # -- stage 1: SFT on the reference chains of thought (loss weights 0/0/1)
    sft_steps: int = 800
    sft_batch: int = 16
    sft_lr: float = 1e-3
    cot_share: float = 0.5
    """Share of the SFT questions given their chain of thought; the rest get the direct prompt and
    the bare answer (the paper's SFT mix, so that MPO has the model's own chains to improve).
    Measured on seed 0: 0.2 (480 sampled questions) left the SFT model at 24.5 % (MPO +6.0); 1.0
    (1200 sampled, no points families) at 80 %, the arithmetic nearly learned and MPO below it
    (-1.7); 0.5 (1200 sampled) at 46 % and MPO +6.0."""
    sft_warmup: float = 0.1
    """Warm-up share of the SFT steps. A from-scratch model given its full rate at once settles on
    the answers' prior and ignores the image (measured on counting alone, 100 steps at 1e-3: with 4
    warm-up steps it stayed at the prior, with 20 it answered every held-out question right)."""
    vision_lr_scale: float = 1.0
    """The vision tower's and projector's rate over the language model's, in every stage."""

    # -- stage 2: preference data from the SFT model's own samples (data_pipeline)
    sample_questions: int = 1200
    """Train questions to sample (0: all of them): 1200 of the 4800 give ~2200 correctness pairs."""
    num_samples: int = 6
    """K responses per checkable question."""
    temperature: float = 0.7
    max_new_tokens: int = 80
    sample_batch: int = 16
    """Questions per generate call (x K rows)."""
    max_pairs: int = 4
    """Pairs kept per question (the pipeline's cap; MMPR uses 15)."""
    ntp_questions: int = 150
    """Describe questions turned into Dropout-NTP pairs (0: none)."""
    pairing: str = "first_error"
    """How the correctness pairs are judged (``mpo.demo.pair_filter``; the pipeline's own pairs stay
    in ``pairs-<source>/``): ``answer``, the pipeline's pairs as they are (right final answer
    against a wrong one); ``right_chains``, those whose chosen chain is right claim by claim;
    ``chains``, every response judged by its chain and paired again (a right chain against any
    other parsable response, lucky right answers included); ``first_error``, the same with each
    rejected chain cut just past its first wrong token. Measured over two rounds on 3 seeds (MPO
    after round 2 over the SFT model): ``first_error`` +14.0 points, ``chains`` +7.7,
    ``right_chains`` +1.9; DPO alone 50.6 % with ``first_error``, 13–28 % with whole chains."""

    # -- stage 3: preference training from the SFT model (MPO, and the two ablations)
    pref_steps: int = 200
    pref_batch: int = 16
    pref_lr: float = 2e-4
    """At 5e-4 DPO alone wrecks the answer format (most held-out answers unparsable)."""
    pref_epochs: float = 0.0
    """At most this many passes over a round's pairs (0: ``pref_steps`` whatever their number). A
    later round has fewer pairs (its model answers more questions every time, and a question
    answered all right or all wrong gives none): 200 steps of 16 over ~350 pairs (9 passes) took MPO
    from 63.0 to 53.8 % on seed 0 (measured)."""
    lr_decay: float = 1.0
    """Round r trains at ``pref_lr x lr_decay^(r-1)``. A later round starts from a model its own
    samples already fit: at the full rate, round 2 of MPO on seed 0 fell from 63.0 to 53.8 % (200
    steps) and 49.8 % (56 steps), losing most on the families round 1 had learnt (measured)."""
    pref_warmup: float = 0.05
    beta: float = 0.1

    # -- the rounds: each method samples its own previous round's model (iterative MPO)
    rounds: int = 2
    """Preference rounds. Round 1 trains each method from the SFT model on pairs from the SFT
    model's samples (the same pairs for all); round r > 1 trains each method from its own round
    r-1 model on pairs from that model's samples: iterative MPO, iterated rejection-sampling
    fine-tuning (SFT on chosen), iterative DPO."""
    reference: str = "previous"
    """The reference of round r > 1: ``previous`` (the model the round starts from, as iterative
    DPO does) or ``initial`` (the SFT model, every round)."""
    fresh_questions: bool = False
    """Round r samples the r-th slice of ``sample_questions`` train questions (wrapping around)
    instead of the same questions every round."""

    # -- stage 4: greedy chain-of-thought evaluation on the held-out questions
    eval_batch: int = 64
    """Questions per greedy generate call."""

    prompt: str = "short"
    """The chain-of-thought template: ``v1`` (the pipeline's official wording) or ``short``."""
    layout: str = "shared_prefix"
    """The trainer's forward layout (``forward.layout``): the prompt once per pair."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


REFERENCES = ("previous", "initial")
PAIRINGS = ("answer", "right_chains", "chains", "first_error")


PRESETS: dict[str, DemoSettings] = {
    "default": DemoSettings(),
    "quick": DemoSettings(
        train_images=8, test_images=4, questions_per_image=2, model_size="tiny", prompt="short",
        sft_steps=40, sft_batch=8, sft_lr=5e-3, num_samples=4, max_new_tokens=40, sample_batch=8,
        max_pairs=2, ntp_questions=4, pref_steps=2, pref_batch=2, eval_batch=8, rounds=2,
    ),
}


# Presets that check every stage runs, on too few questions for their accuracies to mean anything:
# their report says so and judges no target.
STAGE_CHECK_PRESETS = frozenset({"quick"})


def apply_overrides(settings: DemoSettings, overrides: list[str]) -> DemoSettings:
    """``["sft_steps=200", "temperature=0.8"]`` -> a copy with those fields replaced.

    Values are parsed as YAML and must have the field's type (an int is accepted for a float);
    an unknown key is an error listing the valid ones.
    """
    fields = {f.name: f for f in dataclasses.fields(DemoSettings)}
    changes = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected key=value with key one of {', '.join(fields)}")
        value = yaml.safe_load(raw)
        expected = type(getattr(settings, key))
        if expected is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if type(value) is not expected:
            raise ValueError(f"--set {key}: expected {expected.__name__}, got {raw!r}")
        changes[key] = value
    return dataclasses.replace(settings, **changes)
