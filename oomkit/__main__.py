"""``python -m oomkit`` is the ``oomkit`` command."""

import sys

from .cli import main

sys.exit(main())
