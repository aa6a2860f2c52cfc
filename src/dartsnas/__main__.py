"""``python -m dartsnas`` is the ``dartsnas`` command."""

import sys

from .cli import main

sys.exit(main())
