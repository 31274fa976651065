"""`make bench` = `harmonica bench`: see `command.py`."""

import sys

from harmonica.bench.command import main

if __name__ == "__main__":
    sys.exit(main())
