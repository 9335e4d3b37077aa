"""``mpo bench``: training speed and memory of the layouts, optionally raced against TRL.

:mod:`~mpo.tools.bench.race` runs it; :mod:`~mpo.tools.bench.scenarios` defines the pairs and
paths; :mod:`~mpo.tools.bench.measure` the clocks, memory and FLOP model;
:mod:`~mpo.tools.bench.peer_trl` TRL's side; :mod:`~mpo.tools.bench.ideal` the FLOP-ideal ratios.
"""
