"""Builds MMPR-style preference data for MPO: sample, match, pair, Dropout-NTP.

Stages (each a subcommand of ``mpo-data``, ``build`` runs them all):

    sample       K chain-of-thought responses per question       (generation; sharded, resumable)
    match        extract each final answer and judge it; pass rates (CPU; whole file, atomic)
    dropout-ntp  continue half a response without the image       (generation; sharded, resumable)
    pair         correctness, format and Dropout-NTP pairs + meta (CPU; whole file, atomic)
    rl-prompts   questions in a pass-rate band, for verl / TRL    (CPU; the online-RL hand-off)

The output is the MMPR layout (``annotations/*.jsonl`` plus ``meta.json``) the trainer reads,
and per question its pass rate (``pass_rates.jsonl``), from which ``rl-prompts`` selects the
prompts of an online-RL stage; :mod:`data_pipeline.rewards` is that stage's reward.
"""
