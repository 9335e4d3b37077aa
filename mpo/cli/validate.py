"""``mpo validate``: every record, image and video a run will use, checked before it starts.

    mpo validate RECIPE.yaml [key.sub=value ...] [--workers N] [--full] [--report FILE] [--no-progress]

Reading the dataset already checks each line (UTF-8, JSON, fields, the path rule, files present
and not empty). This adds what only decoding finds: each image's header (a real image of a known
format, no larger than ``data.max_image_pixels``) and each video's header and first frame; with
``--full``, every image's pixels and each video's sampled frames. Each file is checked once
(however many records use it), by ``--workers`` threads, with a progress bar. Every bad record is
printed as ``FILE:LINE: FIELD: what`` (and written to ``--report`` as JSONL); any bad record makes
the command fail.

With ``data.validate: true`` the trainer (and ``mpo precompute-ref``) runs the same header pass at
start-up, each process checking its share of the files: bad records then stop the run with that
list, or with ``data.on_bad_sample: skip`` go to ``skipped.jsonl`` before the first step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


from mpo.config import Recipe, load_recipe
from mpo.data.checks import bad_records, check_media, media_of
from mpo.data.records import load_records
from mpo.errors import DataError
from mpo.jsonl import write_jsonl_atomic

def validate(recipe: Recipe, workers: int, full: bool, report: Path | None, progress: bool) -> list[DataError]:
    """Runs the checks; prints each bad record and a summary; returns the bad records."""
    started = time.perf_counter()
    unreadable: list[DataError] = []
    records = load_records(recipe.data, recipe.seed, unreadable)
    media = media_of(records)
    errors = unreadable + bad_records(records, check_media(media, recipe.data, workers, full, progress))
    errors.sort(key=lambda error: (error.file or "", error.line or 0))
    for error in errors:
        print(error)
    if report is not None:
        write_jsonl_atomic(report, (error.to_record() for error in errors))
    images = sum(kind == "image" for kind, _ in media)
    print(
        f"validate: {len({r.source for r in records}) + len(unreadable)} record(s), {images} image(s) and "
        f"{len(media) - images} video(s) checked ({'decoded' if full else 'headers'}) in "
        f"{time.perf_counter() - started:.1f} s: {len(errors)} bad record(s)",
        file=sys.stderr,
    )
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpo validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="the training recipe (YAML)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for training")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="files checked at once (threads)")
    parser.add_argument("--full", action="store_true", help="decode every image and each video's sampled frames, not only headers")
    parser.add_argument("--report", type=Path, help="also write the bad records here (JSONL: file, line, field, error)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    recipe = load_recipe(args.recipe, args.overrides)
    errors = validate(recipe, args.workers, args.full, args.report, not args.no_progress)
    if errors:
        data = recipe.data
        raise DataError(f"{len(errors)} bad record(s), listed above", file=data.meta_path or data.jsonl_path or data.dataset_path)
    return 0


if __name__ == "__main__":
    from mpo.cli.main import exit_on_data_error

    sys.exit(exit_on_data_error(main))
