"""How each OpenAI-compatible server takes InternVL's per-image tile budget (``--server``).

The budget is not part of the OpenAI API; each server reads its own key, and one that does not
know a key ignores it (or refuses the request), tiling at its own default (12 tiles + a thumbnail
for InternVL3):

* ``vllm``: ``mm_processor_kwargs: {"max_patches": N}``, passed to the -hf processor (the server
  must run with ``--trust-request-mm-kwargs``, else it answers HTTP 400);
* ``lmdeploy``: ``"max_dynamic_patch": N`` inside each ``image_url`` part, read by LMDeploy's
  InternVL preprocessor for the original (non ``-hf``) checkpoints; for ``-hf`` checkpoints
  LMDeploy tiles at the processor's ``max_patches`` of the checkpoint, whatever the request says;
* ``sglang``: ``"max_dynamic_patch": N`` in the request and inside each ``image_url`` part (SGLang's
  chat-completions extensions).

``auto`` (the default) asks the first server who it is: ``GET /v1/models`` names its owner
(``owned_by``: vllm, sglang, lmdeploy; ``mpo`` for ``mpo-data serve``, which reads vLLM's key).
A server that names none of these (``transformers serve``, which refuses unknown request fields)
gets no budget key; then the prompt check (:mod:`data_pipeline.prompt_check`) stops the run at the
first prompt whose tiles differ from the trainer's.

Verified against the servers' code: LMDeploy ``lmdeploy/vl/model/internvl.py``
(``params.get('max_dynamic_patch')``) and ``internvl3_hf.py`` (no per-request budget); SGLang
``entrypoints/openai/protocol.py`` (``ChatCompletionRequest.max_dynamic_patch``,
``ChatCompletionMessageContentImageURL.max_dynamic_patch``). Tested here: vLLM 0.32 and
``transformers serve``.
"""

from __future__ import annotations

SERVERS = ("vllm", "lmdeploy", "sglang")
"""The servers whose tile-budget key is known."""

OWNERS = {"vllm": "vllm", "sglang": "sglang", "lmdeploy": "lmdeploy", "mpo": "vllm"}
"""``owned_by`` of ``GET /v1/models`` -> the server whose key is sent (``mpo``: ``mpo-data serve``)."""

KEYS = {
    "vllm": "mm_processor_kwargs.max_patches",
    "lmdeploy": "image_url.max_dynamic_patch",
    "sglang": "max_dynamic_patch (request and image_url)",
}
"""Where each server is sent the budget, in words (for messages)."""


def add_tile_budget(body: dict, server: str | None, per_image: int) -> None:
    """Writes the per-image tile budget into a chat-completions ``body`` where ``server`` reads it.

    Args:
        body: the request body; its ``messages`` carry ``image_url`` parts.
        server: one of :data:`SERVERS`, or ``None`` (an unknown server: nothing is sent).
        per_image: tiles per image (:func:`mpo.data.prompting.tile_budget`).
    """
    if server == "vllm":
        body["mm_processor_kwargs"] = {"max_patches": per_image}
        return
    if server is None:
        return
    if server == "sglang":
        body["max_dynamic_patch"] = per_image
    for message in body["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    part["image_url"]["max_dynamic_patch"] = per_image
