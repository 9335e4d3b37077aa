"""The accelerate loop and its parts: ``PreferenceBatch`` + MPO loss -> optimizer steps.

:mod:`mpo.train.trainer` is the loop (setup in named steps, evaluation as a method); the other
modules are its parts: the launch (:mod:`~mpo.train.distributed`), the optimizer and precision,
checkpoints and model files, metrics, the console, the checks before loading, the skip report,
and the reference pass of ``mpo precompute-ref``. ``python -m mpo.train RECIPE`` runs ``mpo train``.
"""
