"""`python -m loadtest [--quick] [--profile] [--pin] [--big-table]` (all: --help)."""

from loadtest.cli import main

raise SystemExit(main())
