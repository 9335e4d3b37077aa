"""From a ``PreferenceBatch`` to ``SequenceLogps``: the model side of a pair's journey.

* :mod:`~mpo.model.loading` loads the policy, the reference and the processor (freezing, LoRA);
* :mod:`~mpo.model.forward` runs one forward over a batch (vision once per pair);
* :mod:`~mpo.model.fp32_head` scores response positions in fp32; :mod:`~mpo.model.pair_attention`
  holds the shared-prefix and packed attention kernels;
* :mod:`~mpo.model.reference` and :mod:`~mpo.model.precomputed` are the reference's sources;
* :mod:`~mpo.model.tiny` builds the random tiny InternVL checkpoints tests and the demo use.
"""
