"""Record checks: every image and video a run will use, checked before it starts.

Reading the dataset already checks each line (UTF-8, JSON, fields, the path rule, files present
and not empty). This adds what only decoding finds: each image's header (a real image of a known
format, no larger than ``data.max_image_pixels``) and each video's header and first frame; with
``full``, every image's pixels and each video's sampled frames. Each file is checked once
(however many records use it), by a pool of threads. ``mpo validate`` runs it over a whole
recipe; with ``data.validate: true`` the trainer (and ``mpo precompute-ref``) runs the header pass
at start-up (:func:`load_checked_records`), each process checking its share of the files.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from mpo.config import DataConfig, Recipe
from mpo.data.media import load_image, load_video_frames, open_image, probe_video
from mpo.data.records import load_records, source_location
from mpo.errors import DataError
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
            file, line = source_location(record.source)
            errors.append(DataError(problems[bad], file=file, line=line, field=bad[0]))
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
                file=recipe.data.meta_path or recipe.data.jsonl_path or recipe.data.dataset_path,
            )
        if errors:
            skipped.extend(errors)
            dropped = {error.file + f":{error.line}" for error in errors}
            records = [record for record in records if record.source not in dropped]
    if not records:
        raise DataError("no training records", file=recipe.data.meta_path or recipe.data.jsonl_path or recipe.data.dataset_path)
    return records
