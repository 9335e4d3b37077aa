"""The checks before loading: bad settings found before the processor or a model loads."""

from __future__ import annotations

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
