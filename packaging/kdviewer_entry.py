"""Entry point of the frozen app: the same `kdviewer` command as the installed package."""

from __future__ import annotations

import multiprocessing
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()
    from kdviewer.cli import main

    sys.exit(main())
