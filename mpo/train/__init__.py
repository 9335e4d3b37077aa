"""The accelerate loop and its parts: ``PreferenceBatch`` + MPO loss -> optimizer steps.

:mod:`mpo.train.trainer` is the loop (setup in named steps, evaluation as a method); the other
modules are its parts: the launch (:mod:`~mpo.train.distributed`), the optimizer and precision,
checkpoints and model files, metrics, the console, the checks before loading, the skip report,
the reference pass of ``mpo precompute-ref``, and what a run on a cluster needs: one run per output
directory (:mod:`~mpo.train.run_dir`), stopping on signals (:mod:`~mpo.train.signals`), naming a
frozen process (:mod:`~mpo.train.liveness`), saves that fail in one line
(:mod:`~mpo.train.save_failures`) and the last line handed to the launcher (:mod:`~mpo.train.report`).
``python -m mpo.train RECIPE`` runs ``mpo train``.
"""
