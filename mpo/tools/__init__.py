"""Tools around training, each an ``mpo`` subcommand: ``mpo bench`` (:mod:`~mpo.tools.bench`),
``mpo memory`` (:mod:`~mpo.tools.memory`), ``mpo gpu-check`` (:mod:`~mpo.tools.gpu_check`)."""
