"""The pipeline with a real (tiny) InternVL: build, Dropout-NTP, kill-and-resume, the OpenAI backend.

A random tiny model never writes "Final answer:", so every response would be unparsable and no
correctness pair could exist. The module fixture first teaches the tiny model (a few seconds of
SFT on CPU) three responses: a correct one, a wrong one and an unparsable one, so sampling at
temperature 1 draws a mix and every subset of the MMPR output gets pairs. To keep that cheap, the
prompts use a short custom CoT template (v1/v2 are covered by the unit tests), and the images are
three files with the same pixels, so what is learnt on one holds for all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_pipeline.__main__ import main
from data_pipeline.backends import BackendError, GenerationRequest, SamplingParams, TransformersBackend
from data_pipeline.dropout_ntp import NTPSettings, continuation_request, continue_without_image
from data_pipeline.extract import extract_final_answer
from data_pipeline.match import judge
from data_pipeline.openai_client import OpenAIBackend
from data_pipeline.prompts import build_cot_prompt, get_template
from data_pipeline.records import SampleRecord, read_log
from data_pipeline.server import ChatServer
from loopback import free_port, serving
from taught_model import teach
from mpo.data.prompting import INTERNVL_SYSTEM_MESSAGE

REPO = Path(__file__).resolve().parents[2]
TAUGHT_LOSS = 0.1
TEMPLATE = get_template("custom", '{question}\nThink, then write "Final answer: ..".', "final_answer")
PROMPT_FLAGS = ["--prompt", "custom", "--template", TEMPLATE.text, "--answer-format", "final_answer"]
TARGETS = ["I count the shapes.\nFinal answer: 3", "I count the shapes.\nFinal answer: 4", "I am not sure about it."]
IMAGES = ["a.png", "b.png", "c.png"]
QUESTIONS = [
    {"id": "q1", "image": "a.png", "question": "How many shapes are there?", "answer": "3"},
    {"id": "q2", "image": "b.png", "answer": "4",
     "question": "How many shapes are there?\nAnswer the question using a single word or phrase."},
    {"id": "q3", "image": "c.png", "question": "<image>\nHow many shapes are there?", "answer": ["three"]},
    {"id": "q4", "image": "a.png", "question": "Describe the image."},
    {"id": "q5", "images": ["a.png", "c.png"], "question": "How many shapes are there?", "answer": "4"},
]
SAMPLING = ["--num-samples", "6", "--max-new-tokens", "16", "--max-tiles", "2", "--seed", "0", "--no-progress", *PROMPT_FLAGS]


def _teach(model_dir: Path, image_dir: Path) -> None:
    """SFT steps on the three TARGETS after each prompt shape the tests use (with the default system turn)."""
    prompts = [("How many shapes are there?", 1), ("Describe the image.", 1), ("How many shapes are there?", 2)]
    teach(model_dir, image_dir / "a.png", TEMPLATE, prompts, TARGETS, INTERNVL_SYSTEM_MESSAGE, 2, TAUGHT_LOSS)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Path]:
    # One thread: on a small shared CPU two threads of a tiny model mostly wait on each other
    # (10x slower under load). Subprocesses get OMP_NUM_THREADS=1 too, so that every process
    # computes the same floating-point sums and samples the same tokens.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pipeline")
    (root / "images").mkdir()
    for name in IMAGES:
        Image.new("RGB", (64, 64), (200, 40, 40)).save(root / "images" / name)
    with open(root / "questions.jsonl", "w") as handle:
        for line in QUESTIONS:
            handle.write(json.dumps(line) + "\n")
    # The same questions plus two bad lines, for the builds run with --skip-bad.
    shutil.copy(root / "questions.jsonl", root / "with_bad.jsonl")
    with open(root / "with_bad.jsonl", "a") as handle:
        handle.write(json.dumps({"id": "gone", "image": "missing.png", "question": "How many?", "answer": "1"}) + "\n{not json\n")
    shutil.copytree(tiny_model_dir, root / "model")
    _teach(root / "model", root / "images")
    yield root
    torch.set_num_threads(threads)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _build_args(workspace: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--input", str(workspace / "with_bad.jsonl"), "--image-root", str(workspace / "images"), "--skip-bad",
            "--out-dir", str(out), "--model", str(workspace / "model"), "--name", "shapes", *SAMPLING, *extra]


@pytest.fixture(scope="module")
def built(workspace: Path) -> Path:
    out = workspace / "out"
    assert main(_build_args(workspace, out, "--batch-size", "2")) == 0
    return out


def test_build_writes_mmpr_the_trainer_reads(workspace: Path, built: Path, capsys: pytest.CaptureFixture) -> None:
    out = built
    summary = json.loads((out / "work" / "shapes" / "summary.json").read_text())
    assert (summary["questions"], summary["samples"]) == (5, 30)
    assert summary["bad_inputs"] == [
        f"{workspace / 'with_bad.jsonl'}:6: image: image not found: {workspace / 'images' / 'missing.png'}",
        f"{workspace / 'with_bad.jsonl'}:7: <line>: malformed JSON (Expecting property name enclosed in double quotes at column 2)",
    ]
    assert [r["message"] for r in _lines(out / "work" / "shapes" / "bad_inputs.jsonl")] == summary["bad_inputs"]
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(meta) == ["shapes_pairs_vqa_correctness_rules", "shapes_pairs_vqa_format_rules", "shapes_prefix_pair_sr0.5_wo_image"]
    matched = {r["id"]: r for r in _lines(out / "work" / "shapes" / "matched.jsonl")}
    assert sorted(matched) == ["q1", "q2", "q3", "q4", "q5"]
    assert not [p for p in out.rglob("*") if "lock" in p.name]  # no lock files left next to the outputs
    for name, entry in meta.items():
        assert set(entry) == {"root", "annotation", "repeat_time", "length", "max_dynamic_patch", "system_prompt"}
        assert entry["system_prompt"] == INTERNVL_SYSTEM_MESSAGE  # --system-prompt auto, recorded for the trainer
        # Relative to meta.json's folder: the build moves with the folder holding it and the images.
        assert entry["root"] == "../images" and entry["repeat_time"] == 1.0
        assert entry["max_dynamic_patch"] == 2  # the --max-tiles of SAMPLING
        assert entry["annotation"] == f"annotations/{name}.jsonl"
        assert entry["length"] == len(_lines(out / entry["annotation"])) > 0

    prompts = {q["id"]: build_cot_prompt(q["question"], len(q.get("images", [1])), TEMPLATE) for q in QUESTIONS}
    assert prompts["q2"] == "<image>\nHow many shapes are there?\nThink, then write \"Final answer: ..\"."  # instruction stripped
    assert prompts["q5"].startswith("Image-1: <image>\nImage-2: <image>\n")
    correctness = _lines(out / meta["shapes_pairs_vqa_correctness_rules"]["annotation"])
    for line in correctness:
        record = matched[line["chosen_meta"]["id"]]
        assert line["question"] == prompts[record["id"]]
        assert line["image"] == (record["image"][0] if len(record["image"]) == 1 else record["image"])
        assert line["answer_gt"] == record["answer"]
        assert judge(extract_final_answer(line["chosen"]).answer, record["answer"], tuple(record["modes"])).correct
        assert not judge(extract_final_answer(line["rejected"]).answer, record["answer"], tuple(record["modes"])).correct
    # Pairs per question follow from the judged responses: distinct correct x distinct wrong,
    # minus substring overlaps ("3" never overlaps "4" here), at most 15.
    for record in matched.values():
        if record["answer"] is None:
            continue
        status = {}
        for response, judgement in zip(record["responses"], record["judgements"]):
            status.setdefault(response, judgement["status"])
        counts = {s: sum(1 for v in status.values() if v == s) for s in ("correct", "incorrect", "unparsable")}
        pairs = sum(1 for line in correctness if line["chosen_meta"]["id"] == record["id"])
        assert pairs == min(15, counts["correct"] * counts["incorrect"])
    assert any(line["chosen_meta"]["id"] == "q3" for line in correctness)  # "three" judged by VQA normalisation
    formats = _lines(out / meta["shapes_pairs_vqa_format_rules"]["annotation"])
    assert all(extract_final_answer(line["rejected"]).answer is None for line in formats)
    ntp = _lines(out / meta["shapes_prefix_pair_sr0.5_wo_image"]["annotation"])
    assert len(ntp) == 1 and ntp[0]["image"] == "a.png" and ntp[0]["question"] == prompts["q4"]
    assert ntp[0]["rejected"].startswith(ntp[0]["rejected_meta"]["prefix"])
    assert ntp[0]["chosen"].startswith(ntp[0]["rejected_meta"]["prefix"])
    assert summary["subsets"]["shapes_pairs_vqa_correctness_rules"]["pairs"] == len(correctness)

    # Pass rates: one line per judged question, counted from its judgements; none without a ground truth.
    rates = _lines(out / "work" / "shapes" / "pass_rates.jsonl")
    assert [r["id"] for r in rates] == ["q1", "q2", "q3", "q4", "q5"]
    for rate in rates:
        record = matched[rate["id"]]
        status = [j["status"] for j in record["judgements"]]
        assert (rate["samples"], rate["unparsable"], rate["prompt"], rate["image"]) == (6, status.count("unparsable"), record["prompt"], record["image"])
        assert (rate["prompt_version"], rate["max_tiles"], rate["system_prompt"]) == ("custom", 2, INTERNVL_SYSTEM_MESSAGE)
        if record["answer"] is None:
            assert (rate["correct"], rate["pass_rate"]) == (None, None)
        else:
            assert (rate["correct"], rate["pass_rate"]) == (status.count("correct"), status.count("correct") / 6)
    assert summary["pass_rates"]["path"] == str(out / "work" / "shapes" / "pass_rates.jsonl")
    assert (summary["pass_rates"]["questions"], summary["pass_rates"]["no_ground_truth"]) == (4, 1)
    assert sum(summary["pass_rates"]["bins"].values()) == 4
    # Every question with a ground truth lies in [0, 1]: rl-prompts hands all four on, in input order.
    assert main(["rl-prompts", "--pass-rates", summary["pass_rates"]["path"], "--image-root", str(workspace / "images"),
                 "--out-dir", str(out / "rl"), "--min-pass-rate", "0", "--max-pass-rate", "1", "--format", "trl",
                 "--no-progress"]) == 0
    import pyarrow.parquet as pq

    exported = pq.read_table(out / "rl" / "trl.parquet").to_pylist()
    assert [(row["id"], row["pass_rate"]) for row in exported] == [(r["id"], r["pass_rate"]) for r in rates if r["answer"] is not None]

    # The trainer's reader accepts every line and encodes it with the model's processor.
    from transformers import AutoProcessor

    from mpo.config import DataConfig
    from mpo.data.dataset import PreferenceDataset
    from mpo.data.records import load_records

    config = DataConfig(meta_path=str(out / "meta.json"))
    records = load_records(config, seed=0)
    assert len(records) == sum(entry["length"] for entry in meta.values())
    dataset = PreferenceDataset(records, AutoProcessor.from_pretrained(workspace / "model"), config)
    encoded = [dataset[i] for i in range(len(dataset))]
    assert all(not isinstance(e, Exception) for e in encoded)

    # Rerunning the finished build generates nothing and rewrites identical files.
    before = {p.name: p.read_bytes() for p in (out / "annotations").iterdir()}
    assert main(_build_args(workspace, out, "--batch-size", "2")) == 0
    assert "questions: 5   samples: 30   parse failures: " in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (out / "annotations").iterdir()} == before


def _annotations(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "annotations").iterdir())}


def test_stage_commands_reproduce_build(workspace: Path, built: Path, tmp_path: Path) -> None:
    """sample -> match -> dropout-ntp -> pair, run one by one, write what build wrote."""
    images, model = str(workspace / "images"), str(workspace / "model")
    samples, matched, ntp, out = tmp_path / "s.jsonl", tmp_path / "m.jsonl", tmp_path / "n.jsonl", tmp_path / "out"
    generation = ["--model", model, "--batch-size", "2", *SAMPLING]
    assert main(["sample", "--input", str(workspace / "with_bad.jsonl"), "--image-root", images, "--name", "shapes",
                 "--skip-bad", "--out", str(samples), *generation]) == 0
    assert main(["match", "--samples", str(samples), "--out", str(matched), "--no-progress"]) == 0
    ntp_flags = [a for a in generation if a not in PROMPT_FLAGS and a != "--num-samples" and a != "6"]
    assert main(["dropout-ntp", "--samples", str(samples), "--out", str(ntp), *ntp_flags]) == 0
    assert main(["pair", "--matched", str(matched), "--ntp", str(ntp), "--image-root", images, "--out-dir", str(out)]) == 0
    assert _annotations(out) == _annotations(built)
    meta = json.loads((out / "meta.json").read_text())
    assert meta.keys() == json.loads((built / "meta.json").read_text()).keys()
    assert {entry["max_dynamic_patch"] for entry in meta.values()} == {2}  # read from the logs: pair has no --max-tiles
    assert _lines(tmp_path / "m.resample.jsonl") == _lines(built / "work" / "shapes" / "resample.jsonl")
    assert (tmp_path / "m.pass_rates.jsonl").read_bytes() == (built / "work" / "shapes" / "pass_rates.jsonl").read_bytes()


def _outputs(out: Path) -> dict[str, bytes]:
    """What a build leaves for training and RL: the annotations and the pass rates, byte for byte."""
    return {**_annotations(out), "pass_rates.jsonl": (out / "work" / "shapes" / "pass_rates.jsonl").read_bytes()}


def test_sharded_and_resumed_builds_equal_an_uninterrupted_one(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two workers (--shard 0/2, 1/2): the last to finish writes exactly the single-worker output;
    so does a build resumed from a log cut after two questions (and torn mid-line by the kill).

    With --batch-size 1 every question is sampled alone with its own seed, so which worker (and
    which batch) it lands in cannot change its responses.
    """
    assert main(_build_args(workspace, tmp_path / "one", "--batch-size", "1")) == 0
    capsys.readouterr()
    assert main(_build_args(workspace, tmp_path / "two", "--batch-size", "1", "--shard", "0/2")) == 0
    assert "other shards still have work" in capsys.readouterr().err
    assert not (tmp_path / "two" / "meta.json").exists()
    assert main(_build_args(workspace, tmp_path / "two", "--batch-size", "1", "--shard", "1/2")) == 0
    assert "wrote " in capsys.readouterr().out
    logs = sorted(p.name for p in (tmp_path / "two" / "work" / "shapes").glob("samples.*.jsonl"))
    assert logs == ["samples.shard-0-of-2.jsonl", "samples.shard-1-of-2.jsonl"]
    assert all(read_log(tmp_path / "two" / "work" / "shapes" / name) for name in logs)  # both shards had work
    assert _outputs(tmp_path / "two") == _outputs(tmp_path / "one")
    one, two = (json.loads((tmp_path / run / "work" / "shapes" / "summary.json").read_text()) for run in ("one", "two"))
    assert {**two["pass_rates"], "path": None} == {**one["pass_rates"], "path": None}

    log = tmp_path / "one" / "work" / "shapes" / "samples.shard-0-of-1.jsonl"
    resumed_log = tmp_path / "three" / "work" / "shapes" / log.name
    resumed_log.parent.mkdir(parents=True)
    resumed_log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]) + '{"id": "q3", "respon')
    assert main(_build_args(workspace, tmp_path / "three", "--batch-size", "1")) == 0
    assert read_log(resumed_log) == read_log(log)  # the two kept, the torn one and the rest sampled again
    assert _outputs(tmp_path / "three") == _outputs(tmp_path / "one")


def test_dropout_ntp_continues_without_the_image(workspace: Path, tmp_path: Path) -> None:
    backend = TransformersBackend(workspace / "model")
    prompt = build_cot_prompt("Describe the image.", 1, TEMPLATE)
    record = SampleRecord(id="d1", dataset="d", line=1, image=["a.png"], question="Describe the image.", prompt=prompt,
                          answer=None, answer_format="final_answer",
                          responses=["The image shows one red square on a plain background."], finish_reasons=["stop"])
    request = continuation_request(record, "The image shows one red", seed=0)
    assert request.images == () and "<image>" not in request.question and request.system_prompt is None
    encoded = backend.encode(request, max_tiles=6)
    assert "pixel_values" not in encoded
    image_token = backend.processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert image_token not in encoded["input_ids"][0].tolist()
    text = backend.processor.tokenizer.decode(encoded["input_ids"][0])
    assert text == f"<|im_start|>user\n{TEMPLATE.fill('Describe the image.')}<|im_end|>\n<|im_start|>assistant\nThe image shows one red"

    # The stage never opens the image: one record points at a file that does not exist, another at
    # a real one, and both (same id, so same seed) get the same continuation.
    settings = NTPSettings(ratio=0.5, params=SamplingParams(max_new_tokens=12), seed=3)
    outputs = []
    for image in ["missing.png", "a.png"]:
        log = tmp_path / f"ntp-{image}.jsonl"
        continue_without_image([replace(record, image=[image])], backend, settings, log, progress=False)
        outputs.append(read_log(log)[0]["continuations"])
    assert outputs[0] == outputs[1]
    assert outputs[0][0]["prefix"] == "The image shows one red"  # 10 words -> 5
    assert len(outputs[0][0]["continuation"]) > 0


def _sample_args(workspace: Path, questions: Path, out: Path) -> list[str]:
    return ["sample", "--input", str(questions), "--image-root", str(workspace / "images"), "--out", str(out),
            "--model", str(workspace / "model"), "--batch-size", "2", *SAMPLING]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_killed_sample_run_resumes_to_the_same_records(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SIGKILL a real ``mpo-data sample`` mid-run, tear its last line, resume: every record exactly once."""
    questions = tmp_path / "many.jsonl"
    with open(questions, "w") as handle:
        for i in range(40):
            handle.write(json.dumps(dict(QUESTIONS[i % 5], id=f"m{i}")) + "\n")
    resumed = tmp_path / "resumed.jsonl"
    command = [sys.executable, "-m", "data_pipeline", *_sample_args(workspace, questions, resumed)]
    process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # The uninterrupted reference run, while the subprocess is still importing torch.
    reference = tmp_path / "reference.jsonl"
    assert main(_sample_args(workspace, questions, reference)) == 0
    capsys.readouterr()
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if resumed.exists() and resumed.read_text().count("\n") >= 4:
            break
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    done = resumed.read_text().count("\n")
    assert 4 <= done < 40
    with open(resumed, "a") as handle:
        handle.write('{"id": "m39", "responses": ["torn by the ki')  # what a kill mid-write leaves
    # Resumed in this process (a second interpreter start would cost another ~15 s of imports).
    assert main(_sample_args(workspace, questions, resumed)) == 0
    assert f"{done} were done, {40 - done} written now" in capsys.readouterr().err

    got, want = read_log(resumed), read_log(reference)
    assert [r["id"] for r in got].count("m39") == 1
    assert sorted(r["id"] for r in got) == sorted(f"m{i}" for i in range(40))
    assert sorted(got, key=lambda r: r["id"]) == sorted(want, key=lambda r: r["id"])


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[str]:
    """``mpo-data serve``'s server on an ephemeral loopback port, in a thread of this process."""
    with serving(ChatServer(TransformersBackend(workspace / "model"), "tiny", "127.0.0.1", 0, max_tokens=16, max_tiles=2)) as url:
        yield url


def test_openai_backend_matches_local_generation(workspace: Path, tmp_path: Path, server: str) -> None:
    """Through HTTP (base64 images, n, seed) the server samples exactly what the local backend does."""
    questions = workspace / "questions.jsonl"
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    common = ["--input", str(questions), "--image-root", str(workspace / "images"), "--batch-size", "1", *SAMPLING]
    assert main(["sample", *common, "--out", str(local), "--model", str(workspace / "model")]) == 0
    assert main(["sample", *common, "--out", str(remote), "--backend", "openai", "--base-url", server, "--concurrency", "3",
                 "--model", str(workspace / "model")]) == 0  # the processor the server's prompts are checked against
    strip = lambda records: sorted(({k: v for k, v in r.items() if k != "config"} for r in records), key=lambda r: r["id"])  # noqa: E731
    assert strip(read_log(remote)) == strip(read_log(local))
    assert len(read_log(remote)) == 5 and all(len(r["responses"]) == 6 for r in read_log(remote))

    # A prefix continues the assistant turn (continue_final_message) exactly as locally.
    client = OpenAIBackend(server, timeout=60, retries=0)
    assert client.model == "tiny"
    request = GenerationRequest(question="Describe the image.", assistant_prefix="I count", num_samples=2, seed=5)
    params = SamplingParams(max_new_tokens=8)
    local_backend = TransformersBackend(workspace / "model")
    assert client.generate([request], params)[0].texts == local_backend.generate([request], params)[0].texts
    # A request the server refuses is a 400 with its reason, raised at once (not retried).
    with pytest.raises(BackendError, match="HTTP 400 .*0 < top_p <= 1"):
        client.generate([request], SamplingParams(top_p=0.0))
    body = json.dumps({"messages": [{"role": "user", "content": "<image> as text"}]}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(server + "/chat/completions", data=body, method="POST"), timeout=30)
    assert refused.value.code == 400
    assert json.loads(refused.value.read())["error"]["message"] == "the text holds <image> or <video>; send images as image_url parts"
    client.close()


def test_openai_backend_gives_up_after_retries(tmp_path: Path) -> None:
    client = OpenAIBackend(f"http://127.0.0.1:{free_port()}", model="m", timeout=2, retries=1)
    with pytest.raises(BackendError, match="gave up after 2 attempts"):
        client.generate([GenerationRequest(question="hi")], SamplingParams(max_new_tokens=2))
    client.close()
