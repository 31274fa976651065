"""`python -m harmonica ...` (and `torchrun ... -m harmonica train ...`): the command line."""

from .cli import main

raise SystemExit(main())
