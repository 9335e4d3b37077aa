"""The checks before loading: bad settings, trackers without credentials, models not where the
recipe says, kernels this machine lacks: found before the processor or a model loads, in one line."""

from __future__ import annotations

import importlib.util

import pytest

from mpo.errors import DataError


def test_checks_run_before_any_model_loads(tiny_mmpr_dir, tmp_path, make_recipe, train_in_process):
    """The model path does not exist: each error below comes from a check that runs before the
    processor or a model is loaded (else loading would fail first)."""
    recipe = make_recipe(tmp_path / "no-model", tiny_mmpr_dir, tmp_path / "run", max_steps=2)
    with pytest.raises(DataError) as caught:
        train_in_process(recipe, ["train.micro_batch_size=16", "train.gradient_accumulation_steps=2", "train.max_steps=3"])
    assert str(caught.value) == (
        "train.micro_batch_size, train.gradient_accumulation_steps: 24 pairs cannot fill one global batch of 32 "
        "(micro_batch_size 16 x gradient_accumulation_steps 2 x 1 process(es)); lower one of them or use fewer processes"
    )
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = next(t for t in ("aim", "clearml", "dvclive", "swanlab", "trackio", "comet_ml", "mlflow") if t not in available)
    with pytest.raises(DataError, match=rf"^report_to: {missing} is not installed \(pip install {missing}\)"):
        train_in_process(recipe, [f"report_to=[tensorboard, {missing}]"])
    with pytest.raises(DataError, match=rf"^resume_from: {tmp_path / 'gone'} is not a complete checkpoint"):
        train_in_process(recipe, [f"resume_from={tmp_path / 'gone'}"])


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """A home, a working directory and an environment with no W&B credentials nor mode."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_CONFIG_DIR", "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


WANDB_LINE = ("report_to: wandb has no API key: run `wandb login` (or set WANDB_API_KEY), or log offline with WANDB_MODE=offline "
              "and upload later with `wandb sync`")


def test_wandb_without_a_key_is_refused_before_anything_loads(no_wandb_login, tmp_path, make_recipe, train_in_process,
                                                              monkeypatch):
    """Old: the run failed after the model loaded, in a 53-line traceback ending in `UsageError: No
    API key configured`. The model path does not even exist: the check comes first."""
    recipe = make_recipe(tmp_path / "no-model", tmp_path / "no-data", tmp_path / "run")
    with pytest.raises(DataError) as caught:
        train_in_process(recipe, ["report_to=wandb"])
    assert str(caught.value) == WANDB_LINE
    from mpo.train.preflight import check_wandb_credentials

    no_wandb_login.mkdir()
    (no_wandb_login / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    check_wandb_credentials()  # `wandb login`'s entry
    (no_wandb_login / ".netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_wandb_credentials()


def test_model_problems_are_one_line_before_the_model_loads(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, train_in_process):
    """Old: a hub id with HF_HUB_OFFLINE=1 gave 72 lines (150 s of retries online without a
    network); a folder without processor files a 50-line OSError; flash_attention_2 without
    flash-attn 56 lines after the data was read; forward.attention=flex on CPU 116 lines at step 1."""
    import torch
    from huggingface_hub import constants

    recipe = make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "run")
    if constants.HF_HUB_OFFLINE:
        with pytest.raises(DataError) as caught:
            train_in_process(recipe, ["model.name_or_path=OpenGVLab/InternVL3-1B-hf"])
        assert str(caught.value) == (
            f"model.name_or_path: OpenGVLab/InternVL3-1B-hf: no such folder, and not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), which HF_HUB_OFFLINE=1 does not let it download into: run `hf download "
            "OpenGVLab/InternVL3-1B-hf` on a machine with internet, or point model.name_or_path at a local folder")
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(DataError) as caught:
        train_in_process(recipe, [f"model.name_or_path={bare}"])
    assert str(caught.value) == (
        f"model.name_or_path: {bare} has no preprocessor_config.json or processor_config.json; no tokenizer.json or "
        "tokenizer.model or vocab.json: a checkpoint folder needs the model's config, processor and tokenizer files "
        "(copy the missing ones from the checkpoint it was trained from)")
    with pytest.raises(DataError) as caught:
        train_in_process(recipe, [f"model.name_or_path={tmp_path / 'nowhere' / 'model'}"])
    assert str(caught.value) == f"model.name_or_path: {tmp_path / 'nowhere' / 'model'} is not a checkpoint folder (no such directory) nor a hub id (owner/name)"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(DataError) as caught:
            train_in_process(recipe, ["model.attn_implementation=flash_attention_2"])
        assert str(caught.value) == (
            "model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn "
            "--no-build-isolation) and a CUDA GPU; or use sdpa, which needs neither")
    if not torch.cuda.is_available():
        with pytest.raises(DataError) as caught:
            train_in_process(recipe, ["forward.attention=flex"])
        assert str(caught.value) == ("forward.attention: flex needs a CUDA GPU (FlexAttention has no backward pass on CPU); use "
                                     "auto (FlexAttention on CUDA, SDPA elsewhere) or sdpa")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
