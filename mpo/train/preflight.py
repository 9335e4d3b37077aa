"""Checks of a recipe against its data and this machine that need no model: run before any loads.

A model takes minutes to load at 8B; a recipe whose global batch the data cannot fill, a tracker
that is not installed or has no credentials, a model that is not where the recipe says, an
attention kernel or a setting this machine cannot run, or a checkpoint that is not there should
fail in seconds, in one line that names the keys to change.
"""

from __future__ import annotations

import configparser
import importlib.util
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from mpo.train.checkpoint import resolve_resume
from mpo.config import ModelConfig, Recipe
from mpo.errors import DataError
from mpo.data.batch_order import GlobalBatchOrder

WANDB_QUIET_MODES = ("offline", "disabled", "dryrun")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_global_batch(order: GlobalBatchOrder) -> None:
    """The data must fill one global batch (a partial last batch is left out each epoch)."""
    if order.steps_per_epoch == 0:
        raise DataError(
            f"{order.num_records} pairs cannot fill one global batch of {order.global_batch_size} "
            f"(micro_batch_size {order.micro_batch_size} x gradient_accumulation_steps {order.accumulation_steps} "
            f"x {order.world_size} process(es)); lower one of them or use fewer processes",
            field="train.micro_batch_size, train.gradient_accumulation_steps",
        )


def check_trackers(report_to: list[str]) -> None:
    """Every tracker of ``report_to`` is installed (accelerate would drop a missing one silently)."""
    from accelerate.tracking import get_available_trackers

    available = {str(tracker) for tracker in get_available_trackers()}
    for name in report_to:
        if name not in available:
            raise DataError(f"{name} is not installed (pip install {name}), or remove it from the list", field="report_to")


def _wandb_settings() -> configparser.SectionProxy:
    """W&B's own settings files (``wandb login``/``wandb offline`` write them), the local one winning."""
    parser = configparser.ConfigParser()
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    local_dir = Path(os.environ.get("WANDB_DIR", "."))
    parser.read([config_dir / "settings", local_dir / "wandb" / "settings"])
    return parser["default"] if parser.has_section("default") else parser[parser.default_section]


def _netrc_has(host: str) -> bool:
    path = Path(os.environ["NETRC"]).expanduser() if "NETRC" in os.environ else Path("~/.netrc").expanduser()
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_wandb_credentials() -> None:
    """W&B logs only with an API key (``WANDB_API_KEY``, ``wandb login``'s netrc entry, an identity
    token file) or in offline mode; without, ``wandb.init`` fails after the model has loaded."""
    settings = _wandb_settings()
    mode = os.environ.get("WANDB_MODE", settings.get("mode", "online"))
    if mode in WANDB_QUIET_MODES or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    base_url = os.environ.get("WANDB_BASE_URL", settings.get("base_url", "https://api.wandb.ai"))
    if settings.get("api_key") or _netrc_has(urlsplit(base_url).netloc):
        return
    raise DataError("wandb has no API key: run `wandb login` (or set WANDB_API_KEY), or log offline with "
                    "WANDB_MODE=offline and upload later with `wandb sync`", field="report_to")


def check_attention(recipe: Recipe) -> None:
    """Kernels and settings that need what this machine lacks."""
    import torch

    if recipe.model.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise DataError("flash_attention_2 needs the flash-attn package (pip install flash-attn --no-build-isolation) "
                            "and a CUDA GPU; or use sdpa, which needs neither", field="model.attn_implementation")
        if not torch.cuda.is_available():
            raise DataError("flash_attention_2 needs a CUDA GPU; use sdpa on this machine", field="model.attn_implementation")
    if recipe.forward.attention == "flex" and not torch.cuda.is_available():
        raise DataError("flex needs a CUDA GPU (FlexAttention has no backward pass on CPU); use auto (FlexAttention on "
                        "CUDA, SDPA elsewhere) or sdpa", field="forward.attention")


def check_environment(recipe: Recipe) -> None:
    """What a recipe needs from this machine, checked before anything is read or loaded."""
    check_trackers(recipe.report_to)
    if "wandb" in recipe.report_to:
        check_wandb_credentials()
    check_attention(recipe)


def check_model_files(config: ModelConfig) -> None:
    """The checkpoint is where ``model.name_or_path`` says, with its processor files: a local
    folder, a hub id already in the local cache, or (online) a hub id the hub knows."""
    name = config.name_or_path
    if name.startswith("builtin:"):
        return
    path = Path(name).expanduser()
    if path.is_dir():
        missing = [" or ".join(files) for files in (("config.json",), PROCESSOR_FILES, TOKENIZER_FILES)
                   if not any((path / name).exists() for name in files)]
        if missing:
            raise DataError(f"{path} has no {'; no '.join(missing)}: a checkpoint folder needs the model's config, "
                            "processor and tokenizer files (copy the missing ones from the checkpoint it was trained from)",
                            field="model.name_or_path")
        return
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise DataError(f"{name} is not a checkpoint folder (no such directory) nor a hub id (owner/name)", field="model.name_or_path")
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise DataError(f"{name}: no such folder, and not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), "
                        f"which HF_HUB_OFFLINE=1 does not let it download into: run `hf download {name}` on a machine "
                        "with internet, or point model.name_or_path at a local folder", field="model.name_or_path")
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise DataError(f"{name}: no such folder, and not on the Hugging Face hub (or private or gated: log in with "
                        "`hf auth login`)",
                        field="model.name_or_path") from None
    except Exception as error:  # the hub's client raises its HTTP library's own errors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{name}: no such folder, not in the local Hugging Face cache, and the hub cannot be reached "
                        f"({reason}); on a "
                        "machine without internet, download it elsewhere and set HF_HUB_OFFLINE=1, or point "
                        "model.name_or_path at a local folder", field="model.name_or_path") from None


def load_checked_processor(config: ModelConfig):
    """The checkpoint's processor, or one line saying why it does not load."""
    from mpo.model.loading import load_processor

    try:
        return load_processor(config)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot load the processor of {config.name_or_path}: {reason}", field="model.name_or_path") from None


def check_resume(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); a missing one is an error now."""
    try:
        return resolve_resume(recipe.resume_from, recipe.output_dir)
    except FileNotFoundError:
        raise DataError(f"{recipe.resume_from} is not a complete checkpoint (no trainer_state.json); "
                        "use a checkpoints/step-N directory or latest", field="resume_from") from None


def check_reference_vocabulary(recipe: Recipe, tokenizer) -> None:
    """A reference from another checkpoint (``reference.name_or_path``) must read the same token
    ids as the policy: with another vocabulary its log-probs would score other words."""
    from mpo.model.loading import load_processor, reference_model

    reference = load_processor(reference_model(recipe)).tokenizer
    if reference.get_vocab() != tokenizer.get_vocab():
        raise DataError(f"{recipe.reference.name_or_path} has another vocabulary than {recipe.model.name_or_path} "
                        f"({len(reference)} and {len(tokenizer)} tokens, or the same ids for other tokens); "
                        "the reference must share the policy's tokenizer", field="reference.name_or_path")


def check_before_loading(recipe: Recipe, order: GlobalBatchOrder) -> Path | None:
    """The checks of the data and the resume point, then of the model's files; returns the
    checkpoint to resume from."""
    check_global_batch(order)
    resume = check_resume(recipe)
    check_model_files(recipe.model)
    return resume
