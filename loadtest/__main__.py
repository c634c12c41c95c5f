"""`python -m loadtest [--quick] [--profile] [--big-table]`."""

from loadtest.cli import main

raise SystemExit(main())
