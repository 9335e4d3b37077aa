import sys

from mpo.cli.main import main

sys.exit(main())
