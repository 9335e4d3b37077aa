"""The sampling server's prompt checked against the trainer's renderer (``usage.prompt_tokens``).

Real servers on loopback: ``mpo-data serve`` (in a thread), which honours the tile budget sent in
vLLM's key and ignores LMDeploy's, and ``transformers serve`` (a process of this environment,
started and stopped by PID), which has no per-request tile budget at all and tiles every image at
the checkpoint's default (12 + a thumbnail). A run whose server tiles otherwise than the trainer
stops at its first such prompt with one line; one that agrees runs through and says how many
requests were counted. The check passing against vLLM is in ``test_vllm.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from data_pipeline.__main__ import main
from data_pipeline.backends import TransformersBackend
from data_pipeline.server import ChatServer
from loopback import free_port, server_process, serving
from prompt_cases import write_images

QUESTIONS = [
    {"id": "one", "image": "wide.png", "question": "How many shapes are there?", "answer": "3"},
    {"id": "two", "images": ["wide.png", "square.png"], "question": "Which image is wider?", "answer": "A"},
    {"id": "three", "image": "wide.png", "question": "How many red shapes are there?", "answer": "2"},
    {"id": "story", "question": "Tell a short story.", "answer": "no"},
]
REQUIRED = os.environ.get("MPO_REQUIRE_VLLM") == "1"  # CI: the server tests fail rather than skip
# The first record's v1 prompt with its 512x384 image: 101 text tokens and 7 tiles of 16 image tokens
# at the trainer's budget of 6 (a 3x2 grid + the thumbnail), 13 at the default 12 (4x3 + 1).
TRAINER, DEFAULT_TILING = 101 + 7 * 16, 101 + 13 * 16


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_images(tmp_path_factory.mktemp("prompt_check"))
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return root


def sample(inputs: Path, out: Path, url: str, model_dir: Path, *extra: str) -> int:
    return main(["sample", "--input", str(inputs / "questions.jsonl"), "--image-root", str(inputs), "--out", str(out),
                 "--backend", "openai", "--base-url", url, "--model", str(model_dir), "--num-samples", "2",
                 "--max-new-tokens", "4", "--max-tiles", "6", "--batch-size", "1", "--retries", "0", "--no-progress", *extra])


@pytest.fixture(scope="module")
def chat_server(tiny_model_dir: Path):
    """``mpo-data serve`` over the tiny model, tiling at 12 when a request names no budget it reads."""
    with serving(ChatServer(TransformersBackend(tiny_model_dir), "tiny", "127.0.0.1", 0, max_tokens=4, max_tiles=12)) as url:
        yield url


@pytest.mark.parametrize(
    "server, top_level, per_image",
    [("vllm", {"mm_processor_kwargs": {"max_patches": 3}}, {}),
     ("lmdeploy", {}, {"max_dynamic_patch": 3}),
     ("sglang", {"max_dynamic_patch": 3}, {"max_dynamic_patch": 3}),
     (None, {}, {})],
)
def test_each_server_gets_the_budget_in_its_key(inputs, chat_server, server, top_level, per_image):
    """Two images sharing 6 tiles: 3 each, in the key each server reads; an unknown one gets none."""
    from PIL import Image

    from data_pipeline.backends import GenerationRequest, SamplingParams
    from data_pipeline.openai_client import OpenAIBackend

    client = OpenAIBackend(chat_server, model="tiny", retries=0, server=server)
    files = (inputs / "wide.png", inputs / "square.png")
    request = GenerationRequest("Which is wider?", tuple(Image.open(f).convert("RGB") for f in files), files)
    body = client.payload(request, SamplingParams(max_tiles=6), n=1, seed=0)
    client.close()
    keys = {"model", "messages", "n", "temperature", "top_p", "max_tokens", "seed"}
    assert {k: v for k, v in body.items() if k not in keys} == top_level
    images = [part["image_url"] for part in body["messages"][-1]["content"] if part["type"] == "image_url"]
    assert len(images) == 2 and all({k: v for k, v in image.items() if k != "url"} == per_image for image in images)


def test_a_server_that_honours_the_budget_passes(inputs, chat_server, tiny_model_dir, tmp_path, capsys):
    """auto: /v1/models says ``mpo``, which takes vLLM's key; every shape's count equals the trainer's."""
    assert sample(inputs, tmp_path / "samples.jsonl", chat_server, tiny_model_dir) == 0
    err = capsys.readouterr().err.splitlines()
    assert "server: vllm (GET /v1/models); the tile budget goes in mm_processor_kwargs.max_patches" in err
    assert ("server prompt check: 3 of 4 request(s) rendered and counted (3 prompt shape(s)), every count equal to the "
            "server's") in err


def test_a_server_that_ignores_the_budget_is_stopped(inputs, chat_server, tiny_model_dir, tmp_path, capsys):
    """Told it is LMDeploy, the client sends ``image_url.max_dynamic_patch``, which this server does
    not read: it tiles the 512x384 image at 12 tiles + a thumbnail (13 x 16 image tokens) where the
    trainer tiles 6 + 1, and the run stops at that record, before writing it."""
    out = tmp_path / "samples.jsonl"
    assert sample(inputs, out, chat_server, tiny_model_dir, "--server", "lmdeploy") == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    where = f"{inputs / 'questions.jsonl'}:1 (id one)"
    assert last == (f"mpo-data: error: the server's prompt is not the trainer's: {where}: the server counted {DEFAULT_TILING} "
                    f"prompt tokens, the trainer's renderer {TRAINER}; likely cause: tile budget not honoured: the server tiled each image at its "
                    "default budget of 12 tiles, not 6 (sent as image_url.max_dynamic_patch); responses sampled under another "
                    "prompt would be trained under this one (pass --prompt-check off to sample anyway)")
    assert not out.exists() or '"one"' not in out.read_text()


def test_the_check_needs_the_served_checkpoints_processor(inputs, chat_server, tmp_path, capsys):
    """Without --model the processor comes from the served name, here not a checkpoint: one line
    saying what to pass, exit 2, before any request."""
    code = main(["sample", "--input", str(inputs / "questions.jsonl"), "--image-root", str(inputs), "--out",
                 str(tmp_path / "s.jsonl"), "--backend", "openai", "--base-url", chat_server, "--no-progress"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mpo-data: error: the server's prompts are checked against the trainer's renderer, which needs the "
                           "served checkpoint's processor, and none loads from 'tiny' (")
    assert last.endswith("pass --model with the served checkpoint's directory or hub id (only its processor files are read), "
                         "or --prompt-check off")


@pytest.mark.slow
def test_transformers_serve_is_stopped(inputs, tiny_model_dir, tmp_path, capsys):
    """``transformers serve`` (a real server process) takes no tile budget: it answers /v1/models
    with an error, so no key is sent (it refuses unknown request fields), and it tiles the image at
    the checkpoint's default 12 + 1. The first image prompt stops the run."""
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(tiny_model_dir), "--host", "127.0.0.1",
               "--port", str(port := free_port())]
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        if REQUIRED:
            pytest.fail("transformers serve needs fastapi and uvicorn: pip install -e .[serving] (MPO_REQUIRE_VLLM=1)")
        pytest.skip("transformers serve needs fastapi and uvicorn: pip install -e .[serving]")
    url = f"http://127.0.0.1:{port}"
    with server_process(command, url + "/health", tmp_path / "serve.log"):
        code = sample(inputs, tmp_path / "samples.jsonl", url, tiny_model_dir, "--served-model", str(tiny_model_dir),
                      "--samples-per-request", "1")  # it has no n
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert ("server: not recognised from GET /v1/models, so no tile budget is sent (--server vllm|lmdeploy|sglang sends one); "
            "the prompt check stops the run if it tiles otherwise than the trainer") in err
    where = f"{inputs / 'questions.jsonl'}:1 (id one)"
    assert err[-1] == (f"mpo-data: error: the server's prompt is not the trainer's: {where}: the server counted "
                       f"{DEFAULT_TILING} prompt tokens, the trainer's renderer {TRAINER}; likely cause: tile budget not honoured: the server tiled each image "
                       "at its default budget of 12 tiles, not 6 (none sent: the server was not recognised (pass --server "
                       "vllm|lmdeploy|sglang if it is one of them)); responses sampled under another prompt would be trained "
                       "under this one (pass --prompt-check off to sample anyway)")
    print(err[-1])
