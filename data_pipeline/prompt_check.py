"""The sampling server's prompt checked against the trainer's: ``usage.prompt_tokens`` per reply.

A response is trained under the prompt :mod:`mpo.data.prompting` renders; it must have been
sampled under the same one. A server that ignores the tile budget (tiling at its own default, 12
tiles + a thumbnail for InternVL3, while training uses 6), applies another chat template or
adds or drops the system message sends back another ``usage.prompt_tokens`` than the renderer
counts for the same request, and nothing else would show it.

:class:`PromptCheck` renders and counts (tokenizes and tiles with the checkpoint's own processor,
as the trainer does) the first request of each prompt shape (the number of images, their tile
budget, the system message, a continued prefix or not) and every :data:`SAMPLE_EVERY`-th request
after, and compares the count with the server's. On a mismatch the run stops with one line naming
both counts, the record and the likely cause, found by counting the request again as a server
would that did it differently: at the processor's default tile budget, without (or with InternVL's
default) system message; else the chat template.
"""

from __future__ import annotations

import threading

from data_pipeline.backends import BackendError, GenerationRequest
from data_pipeline.server_kinds import KEYS
from mpo.data.prompting import INTERNVL_SYSTEM_MESSAGE, encode_messages, tile_budget

SAMPLE_EVERY = 64
"""After the first request of each prompt shape, one request in this many is checked."""


def prompt_length(processor, request: GenerationRequest, max_tiles: int, system_prompt: str | None = None,
                  drop_system: bool = False) -> int:
    """Tokens of ``request``'s prompt as the trainer renders it (image tokens expanded), optionally
    with another system message (for the diagnosis)."""
    system = None if drop_system else (system_prompt if system_prompt is not None else request.system_prompt)
    messages = GenerationRequest(request.question, request.images, request.image_paths, system, request.assistant_prefix).messages()
    return int(encode_messages(processor, messages, list(request.images), max_tiles)["input_ids"].shape[1])


class PromptCheck:
    """Checks the server's prompt token counts against the trainer's renderer.

    Args:
        processor: the served checkpoint's processor (``AutoProcessor``).
        every: after the first of each shape, check one request in this many.
    """

    def __init__(self, processor, every: int = SAMPLE_EVERY):
        self.processor, self.every = processor, every
        self.lock = threading.Lock()  # requests come from the client's thread pool
        self.shapes: set[tuple] = set()
        self.requests = 0
        self.checked = 0

    def due(self, request: GenerationRequest, max_tiles: int) -> bool:
        """Whether this request is checked (the first of its shape, or the sample's turn)."""
        shape = (len(request.images), tile_budget(max_tiles, len(request.images)), request.system_prompt, bool(request.assistant_prefix))
        with self.lock:
            self.requests += 1
            first = shape not in self.shapes
            self.shapes.add(shape)
            return first or self.requests % self.every == 0

    def verify(self, request: GenerationRequest, max_tiles: int, served: int | None, server: str | None) -> None:
        """Raises :class:`BackendError` (one line) when the server's count differs from the renderer's.

        Args:
            request: the request as sent.
            max_tiles: the tile budget shared by its images.
            served: ``usage.prompt_tokens`` of the server's reply (``None``: it sent none).
            server: which server's key carried the budget (:mod:`data_pipeline.server_kinds`), or ``None``.
        """
        where = request.source or "a request"
        if served is None:
            raise BackendError(f"the server's reply to {where} has no usage.prompt_tokens, so its prompt cannot be checked "
                               "against the trainer's; pass --prompt-check off to sample without the check")
        with self.lock:
            rendered = prompt_length(self.processor, request, max_tiles)
            self.checked += 1
            if served == rendered:
                return
            cause = self._cause(request, max_tiles, served, rendered, server)
        raise BackendError(f"the server's prompt is not the trainer's: {where}: the server counted {served} prompt tokens, "
                           f"the trainer's renderer {rendered}; likely cause: {cause}; responses sampled under another prompt "
                           "would be trained under this one (pass --prompt-check off to sample anyway)")

    def _cause(self, request: GenerationRequest, max_tiles: int, served: int, rendered: int, server: str | None) -> str:
        # Exact re-renders first; a difference that is merely a multiple of one tile's tokens comes
        # last, since a system turn of that many tokens would look the same.
        budget = tile_budget(max_tiles, len(request.images)) if request.images else 0
        sent = (f"sent as {KEYS[server]}" if server else
                "none sent: the server was not recognised (pass --server vllm|lmdeploy|sglang if it is one of them)")
        if request.images:
            default = self.processor.image_processor.max_patches
            if prompt_length(self.processor, request, default * len(request.images)) == served:
                return (f"tile budget not honoured: the server tiled each image at its default budget of {default} tiles, "
                        f"not {budget} ({sent})")
        if request.system_prompt is not None and prompt_length(self.processor, request, max_tiles, drop_system=True) == served:
            return "system message: the server left out the system turn that was sent"
        if request.system_prompt is None and prompt_length(self.processor, request, max_tiles, INTERNVL_SYSTEM_MESSAGE) == served:
            return "system message: the server adds InternVL's default one (send it: --system-prompt auto)"
        if request.images and (served - rendered) % self.processor.image_seq_length == 0:
            tiles = (served - rendered) // self.processor.image_seq_length
            return f"tile budget not honoured: the server's images have {tiles:+d} tile(s) against a budget of {budget} ({sent})"
        return "template: the server's chat template renders the prompt otherwise than the checkpoint's (serve its chat_template)"

    def summary(self) -> str:
        """One line for the end of a run."""
        return (f"server prompt check: {self.checked} of {self.requests} request(s) rendered and counted "
                f"({len(self.shapes)} prompt shape(s)), every count equal to the server's")
