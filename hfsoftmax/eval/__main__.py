"""``python -m hfsoftmax.eval``: see :mod:`hfsoftmax.eval.cli`."""
import sys

from hfsoftmax.eval.cli import main

sys.exit(main())
