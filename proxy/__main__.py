"""`python -m proxy` runs the same CLI as the `idemproxy` console script."""

from proxy.cli import main

raise SystemExit(main())
