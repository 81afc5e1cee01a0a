"""``python -m mfu_callbacks.cli``: the ``mfu-callbacks`` command."""

import sys

from mfu_callbacks.cli import main

sys.exit(main())
