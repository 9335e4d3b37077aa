"""Correctness pairs judged by the whole chain, not only by its final answer.

The pipeline pairs a response with the right final answer against one with a wrong one. With
answers that take few values, a right answer often ends a wrong chain (``0 x 4 = 4. 3 x 2 = 0.``
and the total by luck): over 3 seeds of the demo, 56 % of the distinct chosen responses had a wrong
operation (measured). The shapes task knows each scene and the steps of each question, so
:func:`mpo.demo.chains.check_chain` can judge every claim. Two ways to use it
(``DemoSettings.pairing``):

* ``right_chains`` (:func:`keep_right_chains`): keep the pipeline's correctness pairs whose chosen
  chain is right, drop the others;
* ``chains`` (:func:`pair_by_chains`): judge each sampled response by its chain and pair again,
  with the pipeline's rules otherwise: a right chain against every other parsable response (a
  wrong answer, or the right answer reached by a wrong chain) for correctness pairs, and against
  the unparsable ones for format pairs, at most ``max_pairs`` of each per question;
* ``first_error``: as ``chains``, each rejected chain cut just past its first wrong token. DPO
  has no credit assignment within a response: it pushes down every token after the point where
  the two responses part, and a wrong chain goes on with right steps (``3 + 1 = 4`` after taking
  green's count for blue's), so whole rejected chains teach wrong arithmetic too (measured: round 2
  of MPO on its own chain-judged pairs wrote 154 held-out operations with a false result against
  127 after round 1, seed 0). Cut, the pair holds the error and nothing after it (step-level
  pairs, as in Step-DPO, arXiv 2406.18629, at the granularity of one token).

Either way the other subsets (Dropout-NTP) are kept as the pipeline wrote them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data_pipeline.mmpr import path_in_meta, write_mmpr
from data_pipeline.pairs import CORRECTNESS_SUFFIX, FORMAT_SUFFIX, Pair
from data_pipeline.records import SampleRecord
from data_pipeline.sharding import derive_seed
from mpo.demo.chains import check_chain, first_error_end
from mpo.demo.stages import read_jsonl
from mpo.jsonl import write_json_atomic, write_text_atomic


def _moved(entry: dict, meta_path: Path, out_dir: Path) -> dict:
    """A meta entry of ``meta_path`` as ``out_dir/meta.json`` names its files (the pipeline's paths
    start from its meta.json's folder, the copy's from ``out_dir``)."""
    source = meta_path.resolve().parent
    return {**entry, "root": path_in_meta(out_dir, source / entry["root"]),
            "annotation": path_in_meta(out_dir, source / entry["annotation"])}


def keep_right_chains(meta_path: Path, records: dict[str, dict], out_dir: Path) -> dict:
    """A new MMPR directory ``out_dir`` (its ``meta.json`` and filtered annotations) from ``meta_path``.

    Args:
        meta_path: the pipeline's ``meta.json``.
        records: task record per question id (``scene``, ``cot``, ``answer``) of the sampled questions.
        out_dir: where the filtered copy goes; subsets other than correctness pairs point to the
            pipeline's own annotation files.

    Returns:
        ``{"meta": path, "subsets": {name: pairs}, "dropped": correctness pairs left out}``.
    """
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {name: _moved(entry, meta_path, out_dir) for name, entry in json.loads(meta_path.read_text()).items()}
    dropped = 0
    for name, entry in meta.items():
        if not name.endswith(CORRECTNESS_SUFFIX):
            continue
        lines = read_jsonl(out_dir / entry["annotation"])
        kept = [line for line in lines if check_chain(line["chosen"], records[line["chosen_meta"]["id"]]).correct]
        dropped += len(lines) - len(kept)
        annotation = out_dir / "annotations" / Path(entry["annotation"]).name
        annotation.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(annotation, "".join(json.dumps(line) + "\n" for line in kept))
        meta[name] = {**entry, "annotation": path_in_meta(out_dir, annotation), "length": len(kept)}
    meta = {name: entry for name, entry in meta.items() if entry["length"]}
    write_json_atomic(out_dir / "meta.json", meta)
    return {"meta": str(out_dir / "meta.json"), "subsets": {name: entry["length"] for name, entry in meta.items()},
            "dropped": dropped}


def _unique(indices: list[int], responses: list[str]) -> list[int]:
    """The first index of each distinct non-empty response."""
    seen, kept = set(), []
    for index in indices:
        if responses[index].strip() and responses[index] not in seen:
            seen.add(responses[index])
            kept.append(index)
    return kept


def _capped(candidates: list[tuple[int, int]], limit: int, seed: int) -> list[tuple[int, int]]:
    if len(candidates) <= limit:
        return candidates
    return sorted(random.Random(seed).sample(candidates, limit))


def _pair(record: SampleRecord, chosen: int, rejected: int, task: dict | None) -> Pair:
    """The pair (chosen, rejected) of ``record``'s responses; with ``task``, the rejected response is
    cut just past its first wrong token (:func:`mpo.demo.chains.first_error_end`)."""
    def meta(index: int) -> dict:
        return {"id": record.id, "index": index, "answer": record.judgements[index].answer}

    text = record.responses[rejected]
    end = first_error_end(text, task) if task is not None else None
    extra = {"answer_gt": record.answer, "chosen_meta": meta(chosen), "rejected_meta": meta(rejected)}
    if end is not None:
        text, extra["rejected_cut_from"] = text[:end], text
    return Pair(record.dataset, tuple(record.image), record.prompt, record.responses[chosen], text, record.line, extra)


def pair_by_chains(meta_path: Path, matched_path: Path, records: dict[str, dict], out_dir: Path, max_pairs: int,
                   seed: int, cut_at_first_error: bool = False) -> dict:
    """A new MMPR directory ``out_dir`` whose correctness and format pairs are judged by chains.

    Args:
        meta_path: the pipeline's ``meta.json`` (its other subsets are kept, and its correctness
            subset's root, tile budget and system message are reused).
        matched_path: the pipeline's judged samples (``work/<name>/matched.jsonl``).
        records: task record per question id of the sampled questions.
        out_dir: the new MMPR directory.
        max_pairs: pairs kept per question and kind (the pipeline's cap).
        seed: seeds which pairs are kept when there are more.
        cut_at_first_error: end each rejected chain just past its first wrong token, so that the
            preference terms push down the error and not the right steps written after it.

    Returns:
        ``{"meta": path, "subsets": {name: pairs}, "dropped": correctness pairs of the pipeline whose
        chosen chain is wrong}`` (the count :func:`keep_right_chains` would drop, for the report).
    """
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    source = {name: _moved(entry, meta_path, out_dir) for name, entry in json.loads(meta_path.read_text()).items()}
    matched = [SampleRecord.from_json(line) for line in read_jsonl(matched_path)]
    correctness, format_pairs, datasets = [], [], set()
    for record in matched:
        if record.answer is None:
            continue
        datasets.add(record.dataset)
        task = records[record.id]
        status = [j.status for j in record.judgements]
        right_chain = [s == "correct" and check_chain(response, task).correct for s, response in zip(status, record.responses)]
        right = _unique([i for i, ok in enumerate(right_chain) if ok], record.responses)
        unparsable = _unique([i for i, s in enumerate(status) if s == "unparsable"], record.responses)
        wrong = _unique([i for i, s in enumerate(status) if s != "unparsable" and not right_chain[i]], record.responses)
        cut = task if cut_at_first_error else None
        correctness += [_pair(record, c, r, cut) for c, r in
                        _capped([(c, r) for c in right for r in wrong], max_pairs, derive_seed(seed, "chain-pairs", record.id))]
        format_pairs += [_pair(record, c, r, None) for c, r in
                         _capped([(c, r) for c in right for r in unparsable], max_pairs, derive_seed(seed, "chain-format", record.id))]
    (dataset,) = datasets
    # Every build of the demo samples with one image root, tile budget and system message.
    template = next((source[name] for name in source if name.startswith(dataset)), next(iter(source.values())))
    subsets = {dataset + CORRECTNESS_SUFFIX: correctness, dataset + FORMAT_SUFFIX: format_pairs}
    write_mmpr(out_dir, out_dir / template["root"], subsets, template["max_dynamic_patch"],
               {name: template.get("system_prompt") for name in subsets})
    # No right chain anywhere (a model that has learnt nothing yet) writes no subset, and no meta.json.
    meta = json.loads((out_dir / "meta.json").read_text()) if (out_dir / "meta.json").exists() else {}
    meta.update({name: entry for name, entry in source.items() if name not in subsets})
    write_json_atomic(out_dir / "meta.json", meta)
    pipeline_pairs = source.get(dataset + CORRECTNESS_SUFFIX)
    dropped = sum(not check_chain(line["chosen"], records[line["chosen_meta"]["id"]]).correct
                  for line in read_jsonl(out_dir / pipeline_pairs["annotation"])) if pipeline_pairs else 0
    return {"meta": str(out_dir / "meta.json"), "subsets": {name: entry["length"] for name, entry in meta.items()},
            "dropped": dropped}
