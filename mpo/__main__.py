import sys

from mpo.cli import main

sys.exit(main())
