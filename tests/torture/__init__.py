"""The torture harness (issue 8): a history checker under fault injection.

    python -m tests.torture --duration 180     # make torture

Layout: `upstream` (the durable execution log), `faults` (the TCP fault link), `cluster`
(embedded Postgres + proxy processes + links), `clients` (SDK-like workers recording
every attempt), `slow` (clients that stop reading), `nemesis` (the faults), `checker`
(pure checks over the history), `run`.
"""
