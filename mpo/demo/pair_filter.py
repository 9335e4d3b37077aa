"""Keeps the correctness pairs whose chosen response is right claim by claim, not only in its answer.

The pipeline pairs a response with the right final answer against one with a wrong one. With
answers that take few values, a right answer often ends a wrong chain (``0 x 4 = 4. 3 x 2 = 0.``
and the total by luck): over 3 seeds of the demo, 56 % of the distinct chosen responses had a wrong
operation (measured). The shapes task knows each scene and the steps of each question, so
:func:`mpo.demo.chains.check_chain` can drop those pairs; the other subsets are kept as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.mmpr import path_in_meta
from data_pipeline.pairs import CORRECTNESS_SUFFIX
from mpo.jsonl import write_json_atomic, write_text_atomic
from mpo.demo.chains import check_chain
from mpo.demo.stages import read_jsonl


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
    meta = json.loads(meta_path.read_text())
    out_dir = out_dir.resolve()  # meta.json resolves a relative annotation path against its own folder
    out_dir.mkdir(parents=True, exist_ok=True)
    # The pipeline's paths start from its meta.json's folder; the copy's from out_dir.
    source = meta_path.resolve().parent
    meta = {name: {**entry, "root": path_in_meta(out_dir, source / entry["root"]),
                   "annotation": path_in_meta(out_dir, source / entry["annotation"])} for name, entry in meta.items()}
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
