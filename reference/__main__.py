"""``python -m reference``: the ``learnsparse`` command line."""

import sys

from reference.cli import main

sys.exit(main())
