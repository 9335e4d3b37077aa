"""What bf16 gradient accumulation costs in accuracy, and fp32 accumulation in memory.

    mpo grad-accum [--size bench] [--micro-batches 16 64] [--tokens 256] [--config DIR ...]

A random tiny InternVL (``mpo.model.tiny``, bf16) runs K micro-batches of random text through
forward and backward, as a step of ``train.gradient_accumulation_steps`` K does (each loss divided
by K, as ``accelerator.backward`` does). The summed gradient is then formed three ways:

* ``weights``: autograd adds each micro-batch's bf16 gradient into the bf16 ``.grad``, rounding
  the running sum at every micro-batch (what the trainer does with ``train.grad_accum_dtype:
  weights``, and DDP then all-reduces in bf16);
* ``fp32``: each micro-batch's bf16 gradient is added into an fp32 buffer (``fp32``);
* exact: the same bf16 micro-batch gradients summed in float64.

and compared with the exact sum (the error accumulation adds) and with the gradient of the same
weights held in fp32 (forward and backward in fp32, summed in float64: what a bf16 run can at best
approach). Errors are relative: ``|g - g_ref| / |g_ref|`` over every trainable weight at once.
The memory cost of fp32 accumulation is 4 bytes per trainable 16-bit parameter for the whole step
(the fp32 sums live through every micro-batch's activations), printed for the measured model and
for each ``--config`` (a checkpoint directory, or a folder holding its ``config.json``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch


def _micro_batches(vocab_size: int, count: int, tokens: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (1, tokens), generator=generator) for _ in range(count)]


def _gradients(model, batches: list[torch.Tensor], accumulate: str) -> list[torch.Tensor]:
    """The summed gradient of ``batches`` per trainable parameter (float64), accumulated as
    ``accumulate`` says: ``weights`` (in ``.grad``, the parameters' dtype), ``fp32``, ``exact``."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros(p.shape, dtype=torch.float32 if accumulate == "fp32" else torch.float64) for p in parameters]
    model.zero_grad(set_to_none=True)
    for input_ids in batches:
        loss = model(input_ids=input_ids, labels=input_ids).loss / len(batches)
        loss.backward()
        if accumulate == "weights":
            continue  # autograd adds into .grad
        for total, parameter in zip(sums, parameters):
            if parameter.grad is not None:
                total.add_(parameter.grad.to(total.dtype))
                parameter.grad = None
    if accumulate == "weights":
        return [p.grad.double() if p.grad is not None else torch.zeros(p.shape, dtype=torch.float64) for p in parameters]
    return [total.double() for total in sums]


def relative_error(values: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """``|values - reference| / |reference|`` over all tensors at once."""
    difference = sum(float((v - r).square().sum()) for v, r in zip(values, reference))
    size = sum(float(r.square().sum()) for r in reference)
    return (difference / size) ** 0.5


def measure(size: str, micro_batches: list[int], tokens: int, seed: int) -> list[dict]:
    """One row per K in ``micro_batches``: the relative errors of each accumulation."""
    from transformers import AutoModelForImageTextToText

    from mpo.model.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as directory:
        path = build_tiny_model(directory, size=size, seed=seed)
        bf16 = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
    fp32 = AutoModelForImageTextToText.from_config(bf16.config).float()
    fp32.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})  # the same (bf16) values
    rows = []
    for count in micro_batches:
        batches = _micro_batches(bf16.config.text_config.vocab_size, count, tokens, seed + count)
        exact = _gradients(bf16, batches, "exact")
        truth = _gradients(fp32, batches, "exact")
        in_weights = _gradients(bf16, batches, "weights")
        in_fp32 = _gradients(bf16, batches, "fp32")
        rows.append({
            "micro_batches": count,
            "weights_vs_exact": relative_error(in_weights, exact), "fp32_vs_exact": relative_error(in_fp32, exact),
            "weights_vs_fp32_model": relative_error(in_weights, truth), "fp32_vs_fp32_model": relative_error(in_fp32, truth),
            "exact_vs_fp32_model": relative_error(exact, truth),
        })
    rows.append({"trainable": sum(p.numel() for p in bf16.parameters() if p.requires_grad)})
    return rows


def trainable_parameters(config_dir: str) -> int:
    """Parameters of the checkpoint whose ``config.json`` is in ``config_dir`` (built on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(config_dir))
    model.tie_weights()  # a shared LM head counts once
    return sum(p.numel() for p in model.parameters())


def report(rows: list[dict], configs: dict[str, int], size: str, tokens: int) -> str:
    lines = [f"summed gradient of K micro-batches ({size} model, bf16 weights, {tokens} tokens each), relative error:",
             "  K    bf16 sum vs exact  fp32 sum vs exact  |  bf16 sum vs fp32 model  fp32 sum vs fp32 model  (exact sum vs fp32 model)"]
    for row in rows[:-1]:
        lines.append(f"  {row['micro_batches']:<4} {100 * row['weights_vs_exact']:>16.4f} % {100 * row['fp32_vs_exact']:>16.1e} %"
                     f"  | {100 * row['weights_vs_fp32_model']:>20.4f} % {100 * row['fp32_vs_fp32_model']:>21.4f} %"
                     f"  ({100 * row['exact_vs_fp32_model']:.4f} %)")
    lines.append("memory of fp32 accumulation: 4 bytes per trainable 16-bit parameter, for the whole step:")
    for name, count in {f"{size} model": rows[-1]["trainable"], **configs}.items():
        lines.append(f"  {name}: {count:,} parameters -> {4 * count / 1e9:.2f} GB ({4 * count / 2**30:.2f} GiB) per process "
                     "without sharding")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpo grad-accum", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--size", default="bench", help="the tiny model size measured (mpo.model.tiny: tiny, small, bench)")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[16, 64], help="K, micro-batches per step")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per micro-batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", action="append", default=[], metavar="DIR",
                        help="also print the memory cost for this checkpoint's config (repeatable)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(args.seed)
    rows = measure(args.size, args.micro_batches, args.tokens, args.seed)
    configs = {directory: trainable_parameters(directory) for directory in args.config}
    print(report(rows, configs, args.size, args.tokens))
    return 0
