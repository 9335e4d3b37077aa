"""Iterative MPO: round after round, the policy's own samples judged, paired and trained on.

``mpo iterate CONFIG`` (:mod:`mpo.cli.iterate`) runs :func:`mpo.iterate.loop.run_rounds`: round k
samples round k-1's model (on a vLLM server it starts and stops, a server command of the user's,
or in-process), builds MMPR pairs with the data pipeline, trains from round k-1's weights with round
k-1's model (or the starting one) as the reference, evaluates, and writes ``round-k/``. The package
sits between the entry points (``mpo.cli``, ``mpo.demo``) and the library it drives
(``mpo.train``, ``data_pipeline``).
"""
