"""Entry points only: ``mpo`` (:mod:`mpo.cli.main`) and the modules of its own subcommands.

Nothing in the library imports from here; each command reads its arguments and its recipe, then
calls into :mod:`mpo.train`, :mod:`mpo.data` or :mod:`mpo.model`.
"""

from mpo.cli.main import main

__all__ = ["main"]
