"""`python -m onthefly.cli`: the same as the `onthefly` console script."""

import sys

from .program import main

sys.exit(main())
