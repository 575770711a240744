"""`python -m edgeplane` runs the CLI."""

from edgeplane.runtime.cli import main

raise SystemExit(main())
