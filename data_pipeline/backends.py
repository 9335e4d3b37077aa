"""Generation backends: the embedded transformers model, or OpenAI-compatible servers.

Both take the same :class:`GenerationRequest` (a user turn with ``<image>`` placeholders, the
images, the system message, an optional start of the assistant turn, how many samples, a seed)
and return the texts. The prompt is always :mod:`mpo.data.prompting`'s: the checkpoint's own chat
template over structured messages, the trainer's exact rendering.

* :class:`TransformersBackend` runs an InternVL checkpoint in-process (CPU or GPU), batching the
  requests it is given; each prompt's tiles go through the vision tower once for all its samples.
* :class:`data_pipeline.openai_client.OpenAIBackend` sends the same messages as OpenAI chat parts
  to vLLM, LMDeploy, SGLang or ``mpo-data serve`` (one server or several).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mpo.data.prompting import chat_messages, encode_messages


class BackendError(RuntimeError):
    """Generation failed (model cannot load, server unreachable after retries, bad reply)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy; ``top_k == 0`` means no top-k cut."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    max_tiles: int = 6  # InternVL's max_dynamic_patch: the tile budget shared by a prompt's images


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to sample ``num_samples`` responses for.

    ``images`` are decoded RGB images (validated by the caller); ``image_paths`` the files they
    came from, when there are files, so a remote backend can send the original bytes.
    ``system_prompt`` is the system message text (None: no system turn). ``source`` names the
    record it comes from (``file:line (id ...)``) for messages.
    """

    question: str
    images: tuple[Image.Image, ...] = ()
    image_paths: tuple[Path, ...] = ()
    system_prompt: str | None = None
    assistant_prefix: str = ""
    num_samples: int = 1
    seed: int = 0
    source: str = ""

    def messages(self) -> list[dict]:
        """The structured chat messages of this prompt (:func:`mpo.prompting.chat_messages`)."""
        return chat_messages(self.question, len(self.images), self.system_prompt, self.assistant_prefix)


@dataclass(frozen=True)
class Generation:
    """The sampled continuations (without the prefix) and why each stopped ("stop" or "length")."""

    texts: tuple[str, ...]
    finish_reasons: tuple[str, ...]
    prompt_tokens: int = 0
    completion_tokens: tuple[int, ...] = field(default_factory=tuple)
    prompt_token_ids: tuple[int, ...] = ()  # the prompt as the model saw it (image tokens expanded)


def model_identity(model: str | os.PathLike) -> str:
    """A local checkpoint by its absolute path (so ``./ckpt`` and ``/x/ckpt`` agree), else the hub id."""
    return str(Path(model).resolve()) if Path(model).exists() else str(model)


class TransformersBackend:
    """An InternVL checkpoint loaded with ``AutoModelForImageTextToText`` / ``AutoProcessor``.

    :meth:`generate` samples every request of one call in one batch: each prompt's tiles go
    through the vision tower once, its embedded prompt is repeated ``num_samples`` times and
    left-padded. The torch RNG is seeded from the first request, so a call's output depends only
    on its requests; callers that want results independent of batching send one request per call.
    """

    name = "transformers"

    def __init__(self, model_path: str | os.PathLike, device: str = "auto", dtype: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        try:
            self.processor = AutoProcessor.from_pretrained(model_path)
            self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as error:
            raise BackendError(f"cannot load model from {model_path}: {str(error).splitlines()[0]}") from None
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.model_path = str(model_path)
        tokenizer = self.processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_token_id = self.model.generation_config.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def encode(self, request: GenerationRequest, max_tiles: int) -> dict:
        """Token ids (``[1, T]``) and tiles of one request: exactly what the model is given."""
        return encode_messages(self.processor, request.messages(), list(request.images), max_tiles)

    def embed(self, inputs: dict):
        """``[T, hidden]`` input embeddings of one encoded prompt, its image tokens filled with
        the features of its tiles: the one vision pass that all of its samples share."""
        input_ids = inputs["input_ids"].to(self.device)
        embeddings = self.model.get_input_embeddings()(input_ids)
        if "pixel_values" in inputs:
            pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
            features = self.model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
            image_tokens = (input_ids == self.model.config.image_token_id)[..., None]
            embeddings = embeddings.masked_scatter(image_tokens, features.reshape(-1, features.shape[-1]).to(embeddings.dtype))
        return embeddings[0]

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Generation]:
        import torch

        if not requests:
            return []
        encoded = [self.encode(request, params.max_tiles) for request in requests]
        with torch.inference_mode():
            prompts = [self.embed(inputs) for inputs in encoded]
            length = max(len(prompt) for prompt in prompts)
            rows = sum(request.num_samples for request in requests)
            pad = self.model.get_input_embeddings()(torch.tensor([self.pad_token_id], device=self.device))
            inputs_embeds = pad.repeat(rows, length, 1)
            attention_mask = torch.zeros((rows, length), dtype=torch.long, device=self.device)
            row = 0
            for request, prompt in zip(requests, prompts):
                for _ in range(request.num_samples):
                    inputs_embeds[row, length - len(prompt):] = prompt  # left padding: generation appends on the right
                    attention_mask[row, length - len(prompt):] = 1
                    row += 1
            sampling = {"do_sample": False}
            if params.temperature > 0:
                sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
            torch.manual_seed(requests[0].seed)
            # From embeddings, generate returns the new tokens only.
            new_tokens = self.model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, **sampling,
                max_new_tokens=params.max_new_tokens, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
            ).cpu()
        results, row = [], 0
        for request, inputs in zip(requests, encoded):
            texts, reasons, counts = [], [], []
            for _ in range(request.num_samples):
                tokens = new_tokens[row].tolist()
                row += 1
                stopped = self.eos_token_id in tokens
                if stopped:
                    tokens = tokens[: tokens.index(self.eos_token_id)]
                while tokens and tokens[-1] == self.pad_token_id:
                    tokens.pop()
                texts.append(self.processor.tokenizer.decode(tokens, skip_special_tokens=True))
                reasons.append("stop" if stopped or len(tokens) < params.max_new_tokens else "length")
                counts.append(len(tokens) + int(stopped))
            prompt_ids = tuple(inputs["input_ids"][0].tolist())
            results.append(Generation(tuple(texts), tuple(reasons), len(prompt_ids), tuple(counts), prompt_ids))
        return results

    def describe(self) -> dict:
        """What identifies this backend's outputs (for the resume check)."""
        return {"backend": self.name, "model": model_identity(self.model_path)}

    def close(self) -> None:
        pass
