"""The ``openai`` backend: chat-completions requests to one or several OpenAI-compatible servers.

What is sent is exactly what :mod:`mpo.data.prompting` renders locally, so the server's own chat
template (the checkpoint's) produces the trainer's token ids:

* the messages of :meth:`GenerationRequest.messages`: the system message, the user turn's text
  and image parts in order (images as base64 data URLs of the original file bytes, or of the decoded pixels as PNG
  where a server could decode the file differently), and a prefix as
  a final assistant message with ``continue_final_message: true, add_generation_prompt: false``
  (vLLM's and SGLang's convention; ``mpo-data serve`` follows it);
* the per-image tile budget in the key the server reads (:mod:`data_pipeline.server_kinds`: vLLM's
  ``mm_processor_kwargs: {"max_patches": N}``, with ``--trust-request-mm-kwargs``, else it answers
  HTTP 400; LMDeploy's and SGLang's ``max_dynamic_patch``);
* ``n`` samples in one request (one prefill and one vision pass per prompt on the server) and the
  request's ``seed``.

Each reply's ``usage.prompt_tokens`` is checked against the trainer's renderer on a sample of the
requests (:mod:`data_pipeline.prompt_check`), so a server that tiles, templates or prompts
otherwise stops the run instead of producing pairs trained under another prompt.

Several base URLs (one server per node) share the requests: each goes to the endpoint with the
fewest requests in flight, and a request that fails on one (connection error, timeout, HTTP 429 or
5xx) is retried on the next, with exponential backoff.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import mimetypes
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from data_pipeline.backends import BackendError, Generation, GenerationRequest, SamplingParams
from data_pipeline.prompt_check import PromptCheck
from data_pipeline.server_kinds import OWNERS, add_tile_budget
from mpo.data.media import is_plain_rgb_file
from mpo.data.prompting import tile_budget

# Request fields a server must accept for a prefix to be continued rather than answered.
CONTINUE_FIELDS = ("continue_final_message", "add_generation_prompt")


def image_data_url(image: Image.Image, path: Path | None) -> str:
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


def openai_messages(request: GenerationRequest) -> list[dict]:
    """The request's messages with each image part replaced by an ``image_url`` part, in order."""
    paths = list(request.image_paths) or [None] * len(request.images)
    images = iter(zip(request.images, paths))
    messages = []
    for message in request.messages():
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": image_data_url(*next(images))}} if part["type"] == "image" else part
                for part in content
            ]
        messages.append({"role": message["role"], "content": content})
    return messages


def _endpoint(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class OpenAIBackend:
    """A client for ``POST {base_url}/v1/chat/completions`` on one or several servers.

    Args:
        base_urls: one URL or several (``http://host:port`` or ``.../v1``), all serving the model.
        model: the served model name (default: the first one the first server lists; every
            server must list it).
        api_key: sent as a bearer token.
        concurrency: requests in flight per server.
        timeout: seconds per request.
        retries: further attempts after a retryable failure, each on the next server.
        samples_per_request: split a request's samples into calls of this many (1 for servers
            without ``n``); 0 sends all of them in one call.
        extra_body: JSON merged into every request.
        server: ``vllm``, ``lmdeploy``, ``sglang`` (where the tile budget is sent) or ``auto``
            (asked from ``GET /v1/models``; :mod:`data_pipeline.server_kinds`).
        prompt_check: checks the replies' prompt token counts (:class:`PromptCheck`); ``None``: unchecked.
    """

    name = "openai"

    def __init__(
        self,
        base_urls: str | Sequence[str],
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        retries: int = 3,
        samples_per_request: int = 0,
        extra_body: dict | None = None,
        server: str = "auto",
        prompt_check: PromptCheck | None = None,
    ):
        self.endpoints = [_endpoint(u) for u in ([base_urls] if isinstance(base_urls, str) else base_urls)]
        if not self.endpoints:
            raise BackendError("no server URL given")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.samples_per_request = samples_per_request
        self.extra_body = extra_body or {}
        self.concurrency = max(1, concurrency) * len(self.endpoints)
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="mpo-openai")
        self.in_flight = [0] * len(self.endpoints)
        self.answered = [0] * len(self.endpoints)  # successful calls per endpoint, for the run's report
        self.turn = itertools.count()
        self.lock = threading.Lock()
        if model is None:
            models = self._call("GET", "/models", endpoint=0).get("data") or []
            if not models:
                raise BackendError(f"{self.endpoints[0]}/models lists no model; pass --served-model")
        else:
            models = self._models() if server == "auto" else []
        self.model = model or models[0]["id"]
        # The server kind whose tile-budget key is sent (None: an unknown server, no key).
        self.server = OWNERS.get(models[0].get("owned_by", "") if models else "") if server == "auto" else server
        self.prompt_check = prompt_check
        if len(self.endpoints) > 1:  # a server with another model would quietly mix two models' samples
            # The first server's listing, when already fetched, answers for it.
            for index, endpoint in enumerate(self.endpoints):
                if index > 0 or not models:
                    self._check_serves(endpoint)
                elif self.model not in [m["id"] for m in models]:
                    self._refuse_model(endpoint, [m["id"] for m in models])

    def _request(self, endpoint: str, method: str, path: str, data: bytes | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(endpoint + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def _pick(self, avoid: int | None) -> int:
        """The endpoint with the fewest requests in flight (ties in turn), another than ``avoid`` if any."""
        count = len(self.endpoints)
        with self.lock:
            start = next(self.turn) % count
            best = min(range(count), key=lambda i: (i == avoid, self.in_flight[i], (i - start) % count))
            self.in_flight[best] += 1
            return best

    def _call(self, method: str, path: str, body: dict | None = None, endpoint: int | None = None) -> dict:
        """One call, retried (on the next endpoint) on connection errors, timeouts, 429 and 5xx."""
        data = json.dumps(body).encode("utf-8") if body is not None else None
        last_error, failed = "", None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 30.0))
            index = endpoint if endpoint is not None else self._pick(failed)
            url = self.endpoints[index] + path
            try:
                reply = self._request(self.endpoints[index], method, path, data)
                with self.lock:
                    self.answered[index] += 1
                return reply
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:500]
                if error.code != 429 and error.code < 500:
                    raise BackendError(self._refusal(url, error.code, detail, body)) from None
                last_error = f"HTTP {error.code} from {url}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last_error = f"{url}: {getattr(error, 'reason', error)}"
            except json.JSONDecodeError:
                raise BackendError(f"{url} did not answer JSON") from None
            finally:
                if endpoint is None:
                    with self.lock:
                        self.in_flight[index] -= 1
            failed = index
        raise BackendError(f"gave up after {self.retries + 1} attempts: {last_error}")

    @staticmethod
    def _refusal(url: str, code: int, detail: str, body: dict | None) -> str:
        """The one-line message for a request the server refuses (HTTP 4xx other than 429)."""
        if body and body.get("continue_final_message") and any(name in detail for name in CONTINUE_FIELDS):
            return (f"the server at {url} does not continue a final assistant message (HTTP {code}: it refuses "
                    f"{' / '.join(CONTINUE_FIELDS)}); Dropout-NTP needs a server that does: vLLM, SGLang or mpo-data serve")
        if body and "mm_processor_kwargs" in body and "mm_processor_kwargs" in detail:
            return (f"the server at {url} refuses the per-request tile budget mm_processor_kwargs (HTTP {code}); "
                    f"start vLLM with --trust-request-mm-kwargs. Server said: {detail}")
        return f"HTTP {code} from {url}: {detail}"

    def _models(self) -> list[dict]:
        """``GET /v1/models`` of the first server (its ``data``), only to learn what it is: empty
        when it fails (``transformers serve`` answers HTTP 500 without a hub cache)."""
        try:
            return self._call("GET", "/models", endpoint=0).get("data") or []
        except BackendError:
            return []

    def _check_serves(self, endpoint: str) -> None:
        listed = [m["id"] for m in self._call("GET", "/models", endpoint=self.endpoints.index(endpoint)).get("data") or []]
        if self.model not in listed:
            self._refuse_model(endpoint, listed)

    def _refuse_model(self, endpoint: str, listed: list[str]) -> None:
        raise BackendError(f"{endpoint} does not serve {self.model!r} (it lists {listed}); every --base-url must serve the same model")

    def payload(self, request: GenerationRequest, params: SamplingParams, n: int, seed: int) -> dict:
        """The JSON body of one chat-completions call."""
        body = {
            "model": self.model,
            "messages": openai_messages(request),
            "n": n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "seed": seed,
        }
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if request.images:
            # Per image, as the processor applies it: the prompt's images share the budget.
            add_tile_budget(body, self.server, tile_budget(params.max_tiles, len(request.images)))
        if request.assistant_prefix:
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
            usage = reply.get("usage") or {}
            if call == 0 and self.prompt_check is not None and self.prompt_check.due(request, params.max_tiles):
                self.prompt_check.verify(request, params.max_tiles, usage.get("prompt_tokens"), self.server)
            choices = sorted(reply.get("choices") or [], key=lambda choice: choice.get("index", 0))
            if len(choices) != n:
                raise BackendError(f"asked the server for n={n} choices, got {len(choices)} "
                                   "(set --samples-per-request 1 for servers without n)")
            for choice in choices:
                texts.append((choice.get("message") or {}).get("content") or "")
                reasons.append(choice.get("finish_reason") or "stop")
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
