"""``python -m srcproj``: the same as the ``srcproj`` command."""

from .cli import main

raise SystemExit(main())
