"""The two command lines: usage, version, unknown commands, generated recipe help, flag defaults
and names, exit codes. In-process (argparse exits through SystemExit), no model loads."""

from __future__ import annotations

import argparse
import subprocess
import sys
import dataclasses
import typing

import pytest

from mpo import __version__
from mpo.cli.main import COMMANDS, main
from mpo.cli.train import train_parser
from mpo.config import Recipe
from mpo.config_keys import field_docs, recipe_keys
from mpo.errors import EXIT_BAD_INPUT


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    return caught.value.code


def test_usage_lists_every_command_and_version(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mpo [-h] [--version] COMMAND ...")
    for name in COMMANDS:
        assert f"\n    {name}" in out, name
    assert "Exit codes" in out and "130" in out
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out == f"mpo {__version__}\n"


def test_no_command_and_unknown_command_are_usage_errors(capsys):
    assert _exit_code([]) == EXIT_BAD_INPUT
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err
    assert _exit_code(["bogus"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("usage: mpo ") and "invalid choice: 'bogus'" in err


def _leaf_fields(cls: type, prefix: str = ""):
    """(dotted key, field, owner class) of every leaf field, walked independently of recipe_keys."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, cls


def test_train_help_lists_every_recipe_key_with_type_default_and_doc(capsys):
    assert _exit_code(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mpo train ")
    flat = " ".join(out.split())  # the docs are wrapped
    leaves = list(_leaf_fields(Recipe))
    assert len(leaves) == len(recipe_keys()) > 60
    for key, f, owner in leaves:
        doc = field_docs(owner).get(f.name)
        assert doc, f"{key} has no docstring in mpo/config.py"
        assert f"\n  {key}: " in out, key
        assert " ".join(doc.split()) in flat, key
    # Types and defaults as a user writes them in YAML, checked by hand for a few.
    for line in (
        "  train.lr: float (default: 1.0e-06)",
        "  loss.sft_reduction: sequence|token (default: sequence)",
        "  data.on_bad_sample: error|skip (default: error)",
        "  model.lora.target_modules: list of str (default: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj])",
        "  report_to: list of wandb|tensorboard|mlflow|comet_ml|aim|clearml|dvclive|swanlab|trackio (default: [])",
        "  data.shuffle: bool (default: true)",
        "  model.name_or_path: str (default: '')",
    ):
        assert line + "\n" in out, line
    assert "      Weight of the DPO preference term (0 removes it).\n" in out


def test_train_without_a_recipe_is_a_usage_error(capsys):
    assert _exit_code(["train"]) == EXIT_BAD_INPUT
    assert "the following arguments are required: RECIPE" in capsys.readouterr().err


def test_train_options_and_overrides_mix():
    args = train_parser().parse_intermixed_args(["r.yaml", "train.lr=1", "--launch", "launch/ddp.yaml", "seed=3", "--num-processes", "2"])
    assert (args.recipe, args.overrides, args.launch, args.num_processes) == ("r.yaml", ["train.lr=1", "seed=3"], "launch/ddp.yaml", 2)


def test_launch_config_not_found_is_bad_input(capsys, tmp_path):
    assert main(["train", "--launch", str(tmp_path / "nope.yaml"), "recipes/tiny_cpu.yaml"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.yaml'}: launch config not found (see launch/)\n"


# ---------------------------------------------------------------- mpo-data


def _pipeline_subparsers() -> dict[str, argparse.ArgumentParser]:
    from data_pipeline.__main__ import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def test_mpo_data_shows_every_default_once():
    """Every option that takes a value and is not required states its default exactly once: the
    formatter's ``(default: X)``, or, where the value is None, the help's own words."""
    for name, parser in _pipeline_subparsers().items():
        text = parser.format_help()
        assert "ShardSpec(" not in text and "(default: None)" not in text, name
        formatter = parser.formatter_class(parser.prog)
        for action in parser._actions:
            if action.nargs == 0 or action.required or isinstance(action, argparse._HelpAction):
                continue
            shown = formatter._get_help_string(action)
            assert shown.count("(default:") == 1, (name, action.option_strings, shown)
    build_help = " ".join(_pipeline_subparsers()["build"].format_help().split())
    assert "(default: 0/1)" in build_help and "(default: 8)" in build_help  # --shard, --concurrency


def test_mpo_data_one_name_per_option_across_stages():
    """The same setting has the same flag in every stage (``--ntp-ratio`` in dropout-ntp, pair and
    build alike)."""
    flags: dict[str, set[str]] = {}
    for parser in _pipeline_subparsers().values():
        for action in parser._actions:
            if action.option_strings:
                flags.setdefault(action.dest, set()).update(action.option_strings)
    assert {dest: names for dest, names in flags.items() if len(names) > 1 and dest != "help"} == {}
    assert flags["ntp_ratio"] == {"--ntp-ratio"} and flags["ntp_pairs_per_question"] == {"--ntp-pairs-per-question"}


def test_mpo_data_exit_codes(tmp_path, capsys):
    from data_pipeline.__main__ import main as data_main

    with pytest.raises(SystemExit) as caught:
        data_main(["bogus"])
    assert caught.value.code == EXIT_BAD_INPUT
    capsys.readouterr()
    missing = tmp_path / "missing.jsonl"
    assert data_main(["match", "--samples", str(missing), "--out", str(tmp_path / "m.jsonl")]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == f"mpo-data: error: no such file: {missing}\n"


def test_a_recipe_typo_is_reported_before_torch_loads(tiny_mmpr_dir, tmp_path):
    """``mpo train`` reads the recipe before the trainer is imported: a mistyped key ends the run
    with one line and exit 2 while torch, transformers, accelerate and peft are still unloaded."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: builtin:tiny}}\ndata: {{meta_path: {tiny_mmpr_dir / 'meta.json'}}}\n")
    code = ("import sys; from mpo.cli.main import main; status = main(['train', sys.argv[1], 'train.learning_rate=1']); "
            "print(status, [m for m in ('torch', 'transformers', 'accelerate', 'peft') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "2 []"
    assert result.stderr.strip().startswith(f"error: {recipe}: unknown key train.learning_rate: did you mean train.lr?")


def test_an_output_that_cannot_be_resumed_is_one_line(capsys):
    """``mpo demo --resume`` over samples written with other settings: before, a ResumeError
    traceback (exit 1); now the pipeline's message in one line, exit 2."""
    from data_pipeline.records import ResumeError
    from mpo.cli.main import exit_on_data_error
    from mpo.errors import EXIT_BAD_INPUT

    def job() -> int:
        raise ResumeError("out/work/shapes/samples.shard-0-of-1.jsonl was written with other settings (model, sampling, "
                          "prompt or seed); use another output path, or delete it to start over")

    assert exit_on_data_error(job) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == ("error: out/work/shapes/samples.shard-0-of-1.jsonl was written with other settings "
                                       "(model, sampling, prompt or seed); use another output path, or delete it to start over\n")
