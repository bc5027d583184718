"""``python -m gradaccum``: the same as the ``gradaccum`` command."""

from __future__ import annotations

import sys

from gradaccum.cli import main

if __name__ == "__main__":
    sys.exit(main())
