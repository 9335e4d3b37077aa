"""``mpo gpu-check``: a clean skip without a GPU, and its parts run on CPU as far as a CPU can take
them (FlexAttention has no backward here), so the GPU run meets no untried code but the CUDA kernels."""

from __future__ import annotations

import pytest
import torch

from mpo.tools.gpu_check import check_bench, check_bf16, check_flex, main


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip is what a machine without CUDA does")
def test_without_a_gpu_it_skips_cleanly(capsys):
    assert main([]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    assert printed[0].startswith("mpo gpu-check: skipped, nothing checked: no CUDA device here (torch ")
    assert printed[0].endswith("Run `mpo gpu-check` on a machine with a GPU.")


def test_bf16_check_passes_on_the_tiny_model(tiny_model_dir):
    """Same bf16-representable weights: the terms move by bf16 arithmetic only, well within the
    limits; the policy was moved away from the reference (DPO is not ln 2)."""
    check = check_bf16(torch.device("cpu"), str(tiny_model_dir), vocab_size=2000)
    assert check.passed, check.summary
    assert set(check.figures["fp32"]) == {"dpo", "bco", "sft"}
    assert abs(check.figures["fp32"]["dpo"] - 0.6931471805599453) > 1e-3
    assert 0 < max(check.figures["diff"].values()) < 1e-2  # bf16 did round


def test_flex_check_runs_up_to_flex_backward_on_cpu(tiny_model_dir):
    """Model, both layouts' batches, the SDPA forward and backward, the FlexAttention forward: the
    first thing a CPU cannot do is FlexAttention's backward."""
    with pytest.raises(NotImplementedError, match="FlexAttention does not support backward on CPU"):
        check_flex(torch.device("cpu"), str(tiny_model_dir))


def test_bench_check_summarises_the_bench(tiny_model_dir):
    check = check_bench(1, ["--model", str(tiny_model_dir), "--vocab-size", "2000", "--scenarios", "text_short",
                            "--vision", "frozen", "--paths", "auto,precomputed", "--threads", "1"])
    assert check.passed, check.summary
    assert check.summary.startswith("text_short frozen auto ") and "text_short frozen precomputed " in check.summary
    assert {row["path"] for row in check.figures["rows"]} >= {"plain", "auto", "precomputed"}


def test_mask_check_passes_on_cpu_at_short_rows(capsys):
    """The table gpu-check prints, on the CPU at 256 and 512 tokens: the pair-block builder under
    its bound and under 1/20 of create_block_mask's peak."""
    from mpo.tools.gpu_check import check_mask

    check = check_mask(torch.device("cpu"), "builtin:tiny", (256, 512))
    assert check.passed, check.summary
    assert "block mask vs training step" in capsys.readouterr().out
    assert check.summary.startswith("step peaks (per-pair SDPA): 256 tokens ")  # FlexAttention on a GPU
    assert "block mask at 512 tokens: create_block_mask " in check.summary
