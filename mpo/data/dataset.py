"""Records turned into token ids and pixels: the map-style dataset the trainer's loaders read."""

from __future__ import annotations

from mpo.config import DataConfig
from mpo.data.media import load_image, load_video_frames
from mpo.data.prompting import chat_messages, encode_messages, render
from mpo.data.records import source_location
from mpo.errors import DataError, OverlongPair
from mpo.types import EncodedPair, PreferenceRecord


class PreferenceDataset:
    """Map-style dataset of encoded pairs.

    ``__getitem__`` returns an :class:`EncodedPair`, or a :class:`DataError` for a pair that cannot
    be used (corrupt image, prompt longer than ``max_length``, or an over-long pair with
    ``overlong: drop``) so the caller decides whether that stops the run or is skipped and reported.
    """

    def __init__(self, records: list[PreferenceRecord], processor, config: DataConfig):
        self.records = records
        self.processor = processor
        self.config = config
        self.end_of_turn = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EncodedPair | DataError:
        record = self.records[index]
        try:
            return self.encode(record)
        except DataError as error:
            file, line = source_location(record.source)
            return type(error)(error.reason, file=file, line=line, field=error.field)

    def encode(self, record: PreferenceRecord) -> EncodedPair:
        max_pixels = self.config.max_image_pixels
        images = [load_image(p, max_pixels) for p in record.images]
        video = load_video_frames(record.video, self.config.video_frames, max_pixels) if record.video else None
        messages = chat_messages(record.question, len(images), record.system_prompt, has_video=video is not None)
        if record.rendered_prompt is not None:
            self.check_rendered(record, render(self.processor, messages))
        prompt = encode_messages(self.processor, messages, images, record.max_dynamic_patch, video)
        prompt_ids = prompt["input_ids"][0].tolist()
        tokenizer = self.processor.tokenizer
        chosen_ids = tokenizer(record.chosen, add_special_tokens=False)["input_ids"] + [self.end_of_turn]
        rejected_ids = tokenizer(record.rejected, add_special_tokens=False)["input_ids"] + [self.end_of_turn]
        budget = self.config.max_length - len(prompt_ids)
        if budget < 1:
            raise OverlongPair(f"prompt alone is {len(prompt_ids)} tokens > max_length {self.config.max_length}", field="question")
        truncated = max(len(chosen_ids), len(rejected_ids)) > budget
        if truncated and self.config.overlong == "drop":
            longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
            raise OverlongPair(f"pair is {longest} tokens > max_length {self.config.max_length}", field="chosen/rejected")
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
        return EncodedPair(prompt_ids, chosen_ids, rejected_ids, prompt.get("pixel_values"), record.source, truncated)

    @staticmethod
    def check_rendered(record: PreferenceRecord, rendered: str) -> None:
        """A prompt the data gave rendered must be what the checkpoint's template renders, else its
        token ids would not be the ones the data meant (:mod:`mpo.data.rendered`)."""
        if rendered == record.rendered_prompt:
            return
        at = next((i for i, (a, b) in enumerate(zip(rendered, record.rendered_prompt)) if a != b),
                  min(len(rendered), len(record.rendered_prompt)))
        raise DataError(f"the checkpoint's chat template renders this prompt otherwise (from character {at}: "
                        f"{record.rendered_prompt[at:at + 40]!r} given, {rendered[at:at + 40]!r} rendered); give the plain "
                        "question or TRL's conversational messages", field="prompt")
