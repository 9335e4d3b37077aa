"""Generation backends: the embedded transformers model, or any OpenAI-compatible server.

Both take the same :class:`GenerationRequest` (a user turn with ``<image>`` placeholders, the
images, an optional start of the assistant turn, how many samples, a seed) and return the texts.

* :class:`TransformersBackend` runs an InternVL checkpoint in-process (CPU or GPU), batching the
  requests it is given, with the InternVL processor's dynamic tiling (``mpo.inputs``).
* :class:`OpenAIBackend` sends chat-completions requests concurrently (a thread pool) to vLLM,
  LMDeploy, SGLang or ``mpo-data serve``, with timeouts and retries. Images travel as base64
  data URLs of the original file bytes; a prefix travels as a final assistant message with
  ``continue_final_message`` (the vLLM/SGLang convention ``mpo-data serve`` also follows).
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from data_pipeline.prompts import IMAGE_PLACEHOLDER
from mpo.inputs import is_plain_rgb_file


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
    """

    question: str
    images: tuple[Image.Image, ...] = ()
    image_paths: tuple[Path, ...] = ()
    assistant_prefix: str = ""
    num_samples: int = 1
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    """The sampled continuations (without the prefix) and why each stopped ("stop" or "length")."""

    texts: tuple[str, ...]
    finish_reasons: tuple[str, ...]
    prompt_tokens: int = 0
    completion_tokens: tuple[int, ...] = field(default_factory=tuple)


def model_identity(model: str | os.PathLike) -> str:
    """A local checkpoint by its absolute path (so ``./ckpt`` and ``/x/ckpt`` agree), else the hub id."""
    return str(Path(model).resolve()) if Path(model).exists() else str(model)


class TransformersBackend:
    """An InternVL checkpoint loaded with ``AutoModelForImageTextToText`` / ``AutoProcessor``.

    :meth:`generate` samples every request of one call in one batch: each prompt is repeated
    ``num_samples`` times, left-padded, and its tiles repeated alongside. The torch RNG is seeded
    from the first request, so a call's output depends only on its requests; callers that want
    results independent of batching send one request per call.
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
        from mpo.inputs import encode_prompt

        return encode_prompt(self.processor, request.question, list(request.images), max_tiles, assistant_prefix=request.assistant_prefix)

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Generation]:
        import torch

        if not requests:
            return []
        encoded = [self.encode(request, params.max_tiles) for request in requests]
        rows, tiles = [], []
        for request, inputs in zip(requests, encoded):
            for _ in range(request.num_samples):
                rows.append(inputs["input_ids"][0])
                if "pixel_values" in inputs:
                    # The model fills image tokens with tiles in order, row by row, so each
                    # repeated prompt needs its own copy of its tiles at the matching position.
                    tiles.append(inputs["pixel_values"])
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, length - len(row):] = row  # left padding: generation appends on the right
            attention_mask[index, length - len(row):] = 1
        kwargs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if tiles:
            kwargs["pixel_values"] = torch.cat(tiles).to(self.device, self.model.dtype)
        sampling = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
        torch.manual_seed(requests[0].seed)
        with torch.inference_mode():
            output = self.model.generate(
                **kwargs, **sampling, max_new_tokens=params.max_new_tokens,
                pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
            )
        new_tokens = output[:, length:].cpu()
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
            results.append(Generation(tuple(texts), tuple(reasons), int(inputs["input_ids"].shape[1]), tuple(counts)))
        return results

    def describe(self) -> dict:
        """What identifies this backend's outputs (for the resume check)."""
        return {"backend": self.name, "model": model_identity(self.model_path)}

    def close(self) -> None:
        pass


def _image_data_url(image: Image.Image, path: Path | None) -> str:
    if path is not None and is_plain_rgb_file(path):
        # The original bytes: smaller than a re-encode, and any server decodes the same pixels
        # (not so for an EXIF-rotated photo or 16-bit greyscale, which go as the decoded PNG).
        data = Path(path).read_bytes()
        mime = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless, so the pixels survive the trip
        data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def chat_messages(request: GenerationRequest) -> tuple[list[dict], bool]:
    """OpenAI chat messages for a request, and whether the last one is a prefix to continue.

    The user content interleaves text and ``image_url`` parts at the ``<image>`` placeholders,
    so a server that rebuilds the text (``mpo-data serve`` does) gets the question back verbatim.
    """
    pieces = request.question.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 not in (0, len(request.images)):
        raise ValueError(f"question has {len(pieces) - 1} {IMAGE_PLACEHOLDER} but {len(request.images)} image(s)")
    paths = list(request.image_paths) or [None] * len(request.images)
    content: list[dict] = []
    if len(pieces) == 1 and request.images:
        pieces = [""] * len(request.images) + pieces  # no placeholders: images go first
    for index, text in enumerate(pieces):
        if text:
            content.append({"type": "text", "text": text})
        if index < len(request.images):
            url = _image_data_url(request.images[index], paths[index])
            content.append({"type": "image_url", "image_url": {"url": url}})
    messages = [{"role": "user", "content": content}]
    if request.assistant_prefix:
        messages.append({"role": "assistant", "content": request.assistant_prefix})
    return messages, bool(request.assistant_prefix)


class OpenAIBackend:
    """A client for ``POST {base_url}/v1/chat/completions``, ``concurrency`` requests at a time.

    Connection errors, timeouts, HTTP 429 and 5xx are retried ``retries`` times with exponential
    backoff; other HTTP errors fail at once with the server's message. The per-request ``seed`` is
    sent, so servers that honour it (vLLM, ``mpo-data serve``) give reproducible samples.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        retries: int = 3,
        samples_per_request: int = 0,
        extra_body: dict | None = None,
    ):
        base = base_url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.samples_per_request = samples_per_request  # 0: all of a request's samples in one call (n=K)
        self.extra_body = extra_body or {}
        self.pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="mpo-openai")
        self.concurrency = max(1, concurrency)
        self.model = model or self._first_model()

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8") if body is not None else None
        url = self.base + path
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 30.0))
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:500]
                last_error = f"HTTP {error.code} from {url}: {detail}"
                if error.code != 429 and error.code < 500:
                    raise BackendError(last_error) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last_error = f"{url}: {getattr(error, 'reason', error)}"
            except json.JSONDecodeError:
                raise BackendError(f"{url} did not answer JSON") from None
        raise BackendError(f"gave up after {self.retries + 1} attempts: {last_error}")

    def _first_model(self) -> str:
        listing = self._call("GET", "/models")
        models = listing.get("data") or []
        if not models:
            raise BackendError(f"{self.base}/models lists no model; pass --served-model")
        return models[0]["id"]

    def payload(self, request: GenerationRequest, params: SamplingParams, n: int, seed: int) -> dict:
        """The JSON body of one chat-completions call."""
        messages, continue_final = chat_messages(request)
        body = {
            "model": self.model,
            "messages": messages,
            "n": n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "seed": seed,
        }
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if continue_final:
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        body.update(self.extra_body)
        return body

    def _one(self, request: GenerationRequest, params: SamplingParams) -> Generation:
        per_call = self.samples_per_request or request.num_samples
        texts, reasons, counts, prompt_tokens = [], [], [], 0
        for call, start in enumerate(range(0, request.num_samples, per_call)):
            n = min(per_call, request.num_samples - start)
            # Chunks after the first get their own seeds; with one chunk the seed is the request's.
            seed = request.seed if call == 0 else (request.seed + call * 7919) % (2**31)
            reply = self._call("POST", "/chat/completions", self.payload(request, params, n, seed))
            choices = sorted(reply.get("choices") or [], key=lambda choice: choice.get("index", 0))
            if len(choices) != n:
                raise BackendError(f"asked the server for n={n} choices, got {len(choices)} "
                                   "(set --samples-per-request 1 for servers without n)")
            for choice in choices:
                texts.append((choice.get("message") or {}).get("content") or "")
                reasons.append(choice.get("finish_reason") or "stop")
            usage = reply.get("usage") or {}
            prompt_tokens = usage.get("prompt_tokens", 0)
            counts.extend([0] * n)
        return Generation(tuple(texts), tuple(reasons), prompt_tokens, tuple(counts))

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[Generation]:
        futures = [self.pool.submit(self._one, request, params) for request in requests]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model, "extra_body": self.extra_body, "samples_per_request": self.samples_per_request}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
