"""``python -m portable_lora``: the ``portable-lora`` command line."""

import sys

from .cli import main

sys.exit(main())
