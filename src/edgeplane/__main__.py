"""`python -m edgeplane` runs the CLI."""

from .cli import main

raise SystemExit(main())
