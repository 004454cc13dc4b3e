"""`python -m wicore_cpp` is the same as the `wicore` console script."""

import sys

from wicore_cpp.cli import main

sys.exit(main())
