"""Start-up hook of the vLLM CPU environment that ``scripts/setup_vllm.sh`` builds.

vLLM's CPU wheel pins ``torch==2.13.0+cpu``, and the only torchvision built for that torch is a
CUDA build whose C++ operators fail to load on a machine without CUDA. torchvision then still
imports its pure-Python parts, except that its fake-tensor registrations for ``nms`` and ``qnms``
require those two operators to exist (``RuntimeError: operator torchvision::nms does not
exist``). vLLM's InternVL path only needs the pure-Python image transforms, so defining the two
operator schemas (no kernels) before torchvision is first imported is enough.

Installed as ``_mpo_torchvision_ops.py`` with a ``.pth`` line that imports it; it does nothing
until something imports torchvision.
"""

import importlib.abc
import sys

_LIBRARIES = []  # a torch.library.Library removes its definitions when garbage-collected


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            library = torch.library.Library("torchvision", "FRAGMENT")
            for op in ("nms", "qnms"):
                library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARIES.append(library)
        return None  # the regular finders load torchvision itself


sys.meta_path.insert(0, _DefineTorchvisionOps())
