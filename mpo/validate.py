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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from mpo.config import DataConfig, Recipe, load_recipe
from mpo.data import load_records
from mpo.errors import DataError
from mpo.inputs import load_image, load_video_frames, open_image, probe_video
from mpo.types import PreferenceRecord

Media = tuple[str, str]
"""``(kind, path)``: ``("image", ...)`` or ``("video", ...)``."""


def media_of(records: list[PreferenceRecord]) -> list[Media]:
    """Every file the records use, each once, in first-use order."""
    found = dict.fromkeys(
        [("image", path) for record in records for path in record.images]
        + [("video", record.video) for record in records if record.video]
    )
    return list(found)


def check_media(media: list[Media], config: DataConfig, workers: int, full: bool, progress: bool) -> dict[Media, str]:
    """Checks each file (see the module docstring); returns ``{file: what is wrong}`` for the bad ones."""

    def check(item: Media) -> str | None:
        kind, path = item
        try:
            if kind == "image" and full:
                load_image(path, config.max_image_pixels)
            elif kind == "image":
                open_image(path, config.max_image_pixels).close()
            elif full:
                load_video_frames(path, config.video_frames, config.max_image_pixels)
            else:
                probe_video(path, config.max_image_pixels)
        except DataError as error:
            return error.reason
        return None

    problems = {}
    bar = tqdm(total=len(media), desc="validate", unit="file", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max(1, workers)) as pool, bar:
        for item, problem in zip(media, pool.map(check, media)):
            bar.update(1)
            if problem is not None:
                problems[item] = problem
    return problems


def bad_records(records: list[PreferenceRecord], problems: dict[Media, str]) -> list[DataError]:
    """One error per record (``repeat_time`` copies once) that uses a bad file, in record order."""
    errors, seen = [], set()
    for record in records:
        if record.source in seen:
            continue
        seen.add(record.source)
        uses = [("image", path) for path in record.images] + ([("video", record.video)] if record.video else [])
        bad = next((item for item in uses if item in problems), None)
        if bad is not None:
            file, _, line = record.source.rpartition(":")
            errors.append(DataError(problems[bad], file=file, line=int(line), field=bad[0]))
    return errors


def load_checked_records(
    recipe: Recipe, accelerator, skipped: list[DataError] | None, notes: list[str] | None = None
) -> list[PreferenceRecord]:
    """The records of a training run: read and checked, and with ``data.validate`` their files'
    headers too (each process a share, the findings gathered, so all processes agree).

    Args:
        recipe: the training recipe.
        accelerator: the run's ``Accelerator`` (process index and count).
        skipped: collects bad records in skip mode; ``None`` stops at the first one.
        notes: collects what :func:`mpo.data.load_records` has to say (system-prompt overrides).
    """
    from accelerate.utils import gather_object

    records = load_records(recipe.data, recipe.seed, skipped, notes)
    if recipe.data.validate and records:
        mine = media_of(records)[accelerator.process_index :: accelerator.num_processes]
        workers = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        found = check_media(mine, recipe.data, workers, full=False, progress=accelerator.is_main_process)
        problems = {item: problem for part in gather_object([found]) for item, problem in part.items()}
        errors = bad_records(records, problems)
        if errors and skipped is None:
            if accelerator.is_main_process:
                for error in errors:
                    tqdm.write(str(error))
            raise DataError(
                f"{len(errors)} record(s) use a bad image or video (listed above); fix them, or set data.on_bad_sample: skip",
                file=recipe.data.meta_path or recipe.data.jsonl_path,
            )
        if errors:
            skipped.extend(errors)
            dropped = {error.file + f":{error.line}" for error in errors}
            records = [record for record in records if record.source not in dropped]
    if not records:
        raise DataError("no training records", file=recipe.data.meta_path or recipe.data.jsonl_path)
    return records


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
        from data_pipeline.records import write_jsonl_atomic

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
        raise DataError(f"{len(errors)} bad record(s), listed above", file=recipe.data.meta_path or recipe.data.jsonl_path)
    return 0


if __name__ == "__main__":
    from mpo.cli import exit_on_data_error

    sys.exit(exit_on_data_error(main))
