"""``mpo memory``: per-GPU memory of a recipe under DDP and ZeRO-1/2/3 (+offload).

:mod:`~mpo.tools.memory.planner` runs it; :mod:`~mpo.tools.memory.activations` estimates the
activations; :mod:`~mpo.tools.memory.measure` measures one step for ``--measure``.
"""
