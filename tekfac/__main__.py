"""``python -m tekfac``: the same as the ``tekfac`` console script."""

import sys

from tekfac.cli import main

sys.exit(main())
