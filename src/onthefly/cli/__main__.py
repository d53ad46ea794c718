"""`python -m onthefly.cli`: the same as the `onthefly` console script."""

import sys

from .main import main

sys.exit(main())
