"""From a line of JSONL to a ``PreferenceBatch``: the first stage of a pair's journey.

* :mod:`~mpo.data.mmpr` (``meta.json`` + annotations) and :mod:`~mpo.data.preference_files` (the
  preference rows of TRL, ms-swift and LLaMA-Factory: :mod:`~mpo.data.dataset_files` the
  containers, :mod:`~mpo.data.row_formats` the columns, :mod:`~mpo.data.conversations` the
  messages, :mod:`~mpo.data.rendered` text already rendered) read records;
  :mod:`~mpo.data.records` picks the reader for a recipe, :mod:`~mpo.data.format_hints` names
  the right key for data given to another;
* :mod:`~mpo.data.media` holds the path rule and decodes images and video frames;
* :mod:`~mpo.data.prompting` renders every prompt with the checkpoint's chat template;
* :mod:`~mpo.data.checks` checks every file a run will use; :mod:`~mpo.data.heldout` splits off
  the evaluation pairs;
* :mod:`~mpo.data.dataset` encodes a record into token ids and pixels;
* :mod:`~mpo.data.batch_order` decides which pairs each process scores at each step;
* :mod:`~mpo.data.layouts` lays a micro-batch out in rows (plain, shared prefix, packed, auto).
"""
