"""Allows ``python -m cmedl ...``."""

from cmedl.cli import main

raise SystemExit(main())
