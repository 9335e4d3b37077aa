"""``mpo-data serve``: a test server speaking the OpenAI chat-completions API over the transformers backend.

For trying the ``openai`` backend end to end on one machine, and for checking what a client sends:
it renders every request with the trainer's renderer (:mod:`mpo.data.prompting`, the checkpoint's chat
template) and can return the prompt's token ids. It is a test server, not an engine: requests are
accepted concurrently but generated one at a time (one model, one lock); throughput comes from
``n`` and from a real engine (vLLM, LMDeploy, SGLang).

Endpoints: ``GET /v1/models``, ``GET /health``, ``POST /v1/chat/completions`` with

* ``messages``: an optional ``system`` message, one ``user`` message whose content is a string
  or a list of ``text`` and ``image_url`` parts (``data:`` URLs only: the server fetches nothing),
  optionally followed by an ``assistant`` message to continue (with
  ``continue_final_message: true``);
* ``n``, ``temperature``, ``top_p``, ``top_k``, ``max_tokens`` (or ``max_completion_tokens``),
  ``seed``, ``mm_processor_kwargs: {"max_patches": N}`` (tiles per image, vLLM's name) and
  ``return_token_ids: true`` (the reply then holds ``prompt_token_ids``, as vLLM's does).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from data_pipeline.backends import GenerationRequest, SamplingParams, TransformersBackend
from mpo.errors import DataError
from mpo.data.media import load_image
from mpo.data.prompting import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER


class RequestError(ValueError):
    """A malformed chat-completions request: answered with HTTP 400 and this message."""


def _decode_image(url: str):
    if not url.startswith("data:") or ";base64," not in url:
        raise RequestError("image_url must be a base64 data URL (data:image/...;base64,...); this server fetches nothing")
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image_url holds invalid base64") from None
    try:
        # The same loader as local files, so a served prompt sees the same pixels.
        return load_image(io.BytesIO(data))
    except DataError as error:
        raise RequestError(f"image_url: {error.reason}") from None


def _text(content, role: str) -> str:
    """A system or assistant message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(f"the {role} message content must be a string or a list of text parts")


def _user_turn(content) -> tuple[str, list]:
    """The user content as a question with placeholders, and its images.

    Each image part becomes ``<image>\n``: the renderer reads a newline right after a placeholder
    as the placeholder's own, so the question renders back into exactly the parts received.
    """
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError("user content must be a string or a list of parts")
    question, images = "", []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = str(part.get("text", ""))
            if IMAGE_PLACEHOLDER in text or VIDEO_PLACEHOLDER in text:
                raise RequestError(f"the text holds {IMAGE_PLACEHOLDER} or {VIDEO_PLACEHOLDER}; send images as image_url parts")
            question += text
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise RequestError("image_url part without a url")
            images.append(_decode_image(url))
            question += IMAGE_PLACEHOLDER + "\n"
        else:
            raise RequestError(f"unsupported content part type {kind!r} (use text or image_url)")
    return question, images


def parse_chat_request(body: dict, default_max_tokens: int, default_max_tiles: int) -> tuple[GenerationRequest, SamplingParams]:
    """Turns a chat-completions body into a generation request; raises RequestError when it cannot."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError("'messages' must be a non-empty list of objects")
    roles = [m.get("role") for m in messages]
    system = _text(messages[0].get("content"), "system") if roles[0] == "system" else None
    turns = roles[1:] if roles[0] == "system" else roles
    if turns not in (["user"], ["user", "assistant"]):
        raise RequestError("send an optional system message, one user message, and optionally one assistant message to continue")
    prefix = ""
    if turns[-1] == "assistant":
        if not body.get("continue_final_message") or body.get("add_generation_prompt", False):
            raise RequestError("a final assistant message needs continue_final_message: true and add_generation_prompt: false")
        prefix = _text(messages[-1].get("content"), "assistant")
    question, images = _user_turn(messages[len(messages) - len(turns)].get("content"))
    processor_kwargs = body.get("mm_processor_kwargs") or {}
    if not isinstance(processor_kwargs, dict) or set(processor_kwargs) - {"max_patches"}:
        raise RequestError("mm_processor_kwargs takes max_patches (tiles per image) only")
    try:
        n = int(body.get("n", 1))
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens)
        temperature = float(body.get("temperature", 1.0))
        top_p = float(body.get("top_p", 1.0))
        top_k = int(body.get("top_k", 0) or 0)
        seed = int(body.get("seed", 0) or 0)
        # The renderer splits a budget over the images; per image N, that budget is N per image.
        tiles = int(processor_kwargs["max_patches"]) * max(1, len(images)) if processor_kwargs else default_max_tiles
    except (TypeError, ValueError) as error:
        raise RequestError(f"bad sampling parameter: {error}") from None
    if not 1 <= n <= 256 or max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or tiles < 1:
        raise RequestError("need 1 <= n <= 256, max_tokens >= 1, temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_patches >= 1")
    request = GenerationRequest(question=question, images=tuple(images), system_prompt=system, assistant_prefix=prefix,
                                num_samples=n, seed=seed)
    return request, SamplingParams(temperature, top_p, top_k, max_tokens, tiles)


class ChatServer(ThreadingHTTPServer):
    """The HTTP server; ``serve_forever()`` runs it, ``server_address`` holds the bound port."""

    daemon_threads = True

    def __init__(self, backend: TransformersBackend, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 max_tokens: int = 1024, max_tiles: int = 6, verbose: bool = False):
        self.backend = backend
        self.model_name = model_name
        self.max_tokens = max_tokens
        self.max_tiles = max_tiles
        self.verbose = verbose
        self.generate_lock = threading.Lock()  # one model, one generation at a time
        super().__init__((host, port), _Handler)

    def complete(self, body: dict) -> dict:
        request, params = parse_chat_request(body, self.max_tokens, self.max_tiles)
        with self.generate_lock:
            try:
                generation = self.backend.generate([request], params)[0]
            except DataError as error:  # e.g. placeholders that do not match the images
                raise RequestError(str(error)) from None
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
            for i, (text, reason) in enumerate(zip(generation.texts, generation.finish_reasons))
        ]
        completion = sum(generation.completion_tokens)
        reply = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": generation.prompt_tokens, "completion_tokens": completion,
                      "total_tokens": generation.prompt_tokens + completion},
        }
        if body.get("return_token_ids"):
            reply["prompt_token_ids"] = list(generation.prompt_token_ids)
        return reply


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, value: dict) -> None:
        data = json.dumps(value).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/health", "/v1/health"):
            self._send(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model", "owned_by": "mpo"}]})
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length).decode("utf-8"))
            if not isinstance(body, dict):
                raise RequestError("the body must be a JSON object")
            self._send(200, self.server.complete(body))
        except (RequestError, json.JSONDecodeError, UnicodeDecodeError) as error:
            self._error(400, str(error), "invalid_request_error")
        except Exception as error:  # noqa: BLE001 - a server answers 500 rather than dying
            self._error(500, f"{type(error).__name__}: {error}", "server_error")

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if self.server.verbose:
            sys.stderr.write(f"[serve] {self.address_string()} {format % args}\n")
