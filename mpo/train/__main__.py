"""``python -m mpo.train RECIPE`` (what ``accelerate launch -m mpo.train`` runs): ``mpo train``."""

import sys

from mpo.cli.train import main

sys.exit(main())
