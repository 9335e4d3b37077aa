"""The README is true: every command it shows runs with flags and keys that exist, its memory figures
are what ``mpo memory`` prints, and the setup and cluster examples a new user needs are there.

Before: the README never said to activate ``.venv`` (after ``make demo``, ``mpo``: command not
found), its ``mpo memory`` figures were stale (8B ZeRO-1 63.7 / ZeRO-3 25.9 / offload 9.2 GiB
where the tool printed 59.9 / 22.1 / 5.4; the 1B recipe said 78 / 29 GiB, the tool 56.5 / 21.5),
it used ``--num_processes``, which ``mpo train`` refuses, and it had no SLURM or torchrun example.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

from data_pipeline.__main__ import build_parser as data_parser
from mpo.cli.main import COMMANDS
from mpo.config import Recipe, _leaf_keys, load_recipe

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
KEYS = set(_leaf_keys(Recipe))
OVERRIDE_COMMANDS = {"train", "validate", "memory", "precompute-ref"}
"""``mpo`` subcommands that take ``key=value`` recipe overrides."""
PLACEHOLDER_KEYS = {"key", "key.sub"}
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1", ")"}


def _help(run) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        run()
    return out.getvalue()


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", text))


@pytest.fixture(scope="module")
def mpo_flags() -> dict[str, set[str]]:
    return {name: _flags(_help(lambda: importlib.import_module(module).main(["--help"]))) for name, (module, _) in COMMANDS.items()}


@pytest.fixture(scope="module")
def data_flags() -> dict[str, set[str]]:
    parser = data_parser()
    commands = ["sample", "match", "dropout-ntp", "pair", "build", "rl-prompts", "serve"]
    return {name: _flags(_help(lambda: parser.parse_args([name, "--help"]))) for name in commands}


def _code_lines() -> list[str]:
    """Shell lines of the README: fenced blocks (but program output) and 4-space indented blocks,
    backslash continuations joined."""
    lines = []
    for language, body in re.findall(r"```(\w*)\n(.*?)```", README, re.DOTALL):
        if language in ("bash", "sh", ""):
            lines += body.splitlines()
    outside = re.sub(r"```.*?```", "", README, flags=re.DOTALL)
    lines += [line for line in outside.splitlines() if line.startswith("    ") and not line.strip().startswith(("|", "* ", "- "))]
    joined, pending = [], ""
    for line in lines:
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        joined.append(pending)
        pending = ""
    # The lines that run something of this project (a layout listing or a program's output does not).
    return [line for line in joined if re.search(r"(^|[\s'])(mpo|mpo-data|\.venv/bin/mpo)\s|-m mpo\.", line)]


def _commands(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """``(program, arguments)`` of every mpo, mpo-data and ``-m mpo.train`` call among shell tokens,
    inside ``bash -c '...'`` strings too."""
    found = []
    for index, token in enumerate(tokens):
        if "\n" in token or ("mpo" in token and " " in token):
            for inner in re.split(r"\n|;|&&", token):
                found += _commands(shlex.split(inner, comments=True))
            continue
        program = None
        if token in ("mpo", "mpo-data", ".venv/bin/mpo", ".venv/bin/mpo-data"):
            program = token.removeprefix(".venv/bin/")
        elif token == "-m" and index + 1 < len(tokens) and tokens[index + 1] in ("mpo.train", "mpo.cli.precompute_ref"):
            program = "mpo train" if tokens[index + 1] == "mpo.train" else "mpo precompute-ref"
            index += 1
        if program is None:
            continue
        rest = []
        for argument in tokens[index + 1:]:
            if argument in SHELL_OPERATORS:
                break
            rest.append(argument.strip("[]"))
        found.append((program, rest))
    return found


def _all_commands() -> list[tuple[str, str, list[str]]]:
    commands = []
    for line in _code_lines():
        commands += [(line, program, args) for program, args in _commands(shlex.split(line, comments=True))]
    for span in re.findall(r"`((?:mpo|mpo-data) [^`]+)`", README):
        commands += [(span, program, args) for program, args in _commands(shlex.split(span))]
    return commands


def _check_overrides(line: str, arguments: list[str]) -> None:
    for argument in arguments:
        key = argument.split("=", 1)[0]
        if "=" in argument and not argument.startswith("-") and re.fullmatch(r"[a-z_][a-z0-9_.]*", key) and key not in PLACEHOLDER_KEYS:
            assert key in KEYS, f"README: unknown recipe key {key!r} in: {line}"


def test_every_command_uses_flags_and_keys_that_exist(mpo_flags, data_flags):
    commands = _all_commands()
    assert len(commands) > 40, "the README's commands were not found"
    for line, program, arguments in commands:
        if program == "mpo-data":
            subcommand, *rest = arguments
            if subcommand.startswith("--"):  # a flag named without its stage (`mpo-data --max-tiles N`)
                subcommand, rest, known = "", arguments, set().union(*data_flags.values())
            else:
                assert subcommand in data_flags, f"README: no mpo-data {subcommand}: {line}"
                known = data_flags[subcommand]
        else:
            if program == "mpo":
                subcommand, *rest = arguments
            else:  # -m mpo.train / -m mpo.cli.precompute_ref
                subcommand, rest = program.split()[1], arguments
            if subcommand.startswith("-") or subcommand.endswith(":"):
                continue  # mpo --help, mpo --version; a quoted error line (`mpo train: error: ...`)
            assert subcommand in mpo_flags, f"README: no mpo {subcommand}: {line}"
            known = mpo_flags[subcommand]
            if subcommand in OVERRIDE_COMMANDS:
                _check_overrides(line, rest)
        for argument in rest:
            if argument.startswith("--"):
                assert argument.split("=")[0] in known, f"README: {program} {subcommand} has no {argument.split('=')[0]}: {line}"


def test_every_recipe_key_named_exists():
    named = set(re.findall(r"`((?:model|data|loss|forward|train|reference)\.[a-z0-9_.]*[a-z0-9_*])", README))
    weights = {name for name in named if name.startswith("model.language_model")}  # checkpoint tensor names
    for name in sorted(named - weights):
        if name.endswith(".*"):
            assert any(key.startswith(name[:-1]) for key in KEYS), f"README names {name}, no such section"
        else:
            assert name in KEYS, f"README names {name!r}, not a recipe key"


def _memory_blocks() -> list[tuple[str, str]]:
    return re.findall(r"<!-- (mpo memory [^>]*?) -->\n\s*```text\n(.*?)\n\s*```", README, re.DOTALL)


def _memory_report(command: str) -> str:
    from mpo.tools.memory.planner import report

    args = shlex.split(command)[2:]
    recipe, options, overrides = args[0], {}, []
    rest = iter(args[1:])
    for argument in rest:
        if argument.startswith("--"):
            options[argument[2:].replace("-", "_")] = int(next(rest))
        else:
            overrides.append(argument)
    return report(load_recipe(REPO / recipe, overrides), options.pop("world_size"), **options)


def test_memory_figures_are_what_the_tool_prints():
    blocks = _memory_blocks()
    assert len(blocks) >= 2, "the README's mpo memory figures were not found"
    for command, shown in blocks:
        printed = _memory_report(command)
        assert [line.strip() for line in shown.splitlines()] == [line.strip() for line in printed.splitlines()], (
            f"README's figures for `{command}` are stale; the tool prints:\n{printed}")


def test_the_1b_recipes_memory_comment_is_what_the_tool_prints():
    text = (REPO / "recipes" / "internvl3_1b_mpo.yaml").read_text()
    (command,) = re.findall(r"#\s+(mpo memory .*)", text)
    said = re.search(r"at ([\d.]+) GiB per GPU.*?gradient_checkpointing=true \(([\d.]+) GiB\)", text, re.DOTALL)
    assert said is not None
    for stated, extra in zip(said.groups(), ["", " model.gradient_checkpointing=true"]):
        ddp = next(line for line in _memory_report(command + extra).splitlines() if line.startswith("DDP"))
        assert stated == ddp.split()[-2], (command + extra, ddp)  # the total column, as printed


def test_setup_and_cluster_examples_are_there():
    setup = README[README.index("## Setup"):README.index("## The demo")]
    assert "make setup\nsource .venv/bin/activate" in setup  # after make demo, `mpo` is on the PATH only so
    assert "--index-url https://download.pytorch.org/whl/" in setup and "pip install --no-deps -e ." in setup
    blocks = re.findall(r"```bash\n(.*?)```", README, re.DOTALL)
    training = [b for b in blocks if "#SBATCH --nodes" in b and "mpo train --launch" in b]
    assert training and all(f in training[0] for f in ("--machine-rank", "--main-process-ip", "--num-machines", "--num-processes"))
    assert any("torchrun" in b and "-m mpo.train" in b for b in blocks)
    sampling = [b for b in blocks if "mpo-data build" in b and "--shard" in b and "SLURM_PROCID" in b]
    assert sampling and "--base-url http://localhost:8000/v1" in sampling[0]
    assert any("--base-url $(scontrol show hostnames" in b for b in blocks)
