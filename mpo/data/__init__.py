"""From a line of JSONL to a ``PreferenceBatch``: the first stage of a pair's journey.

* :mod:`~mpo.data.mmpr` (``meta.json`` + annotations) and :mod:`~mpo.data.trl_dataset` (TRL's
  preference columns) read records; :mod:`~mpo.data.records` picks the reader for a recipe;
* :mod:`~mpo.data.media` holds the path rule and decodes images and video frames;
* :mod:`~mpo.data.prompting` renders every prompt with the checkpoint's chat template;
* :mod:`~mpo.data.checks` checks every file a run will use; :mod:`~mpo.data.heldout` splits off
  the evaluation pairs;
* :mod:`~mpo.data.dataset` encodes a record into token ids and pixels;
* :mod:`~mpo.data.batch_order` decides which pairs each process scores at each step;
* :mod:`~mpo.data.layouts` lays a micro-batch out in rows (plain, shared prefix, packed, auto).
"""
