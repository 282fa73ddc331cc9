"""`python -m kvpatch.cli ...`, the same as the `kvpatch` command."""

import sys

from . import main

sys.exit(main())
