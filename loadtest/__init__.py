"""The load harness (issue #7): idemproxy against its baselines, as ratios within one run.

`make bench` (or `python -m loadtest`) starts PostgreSQL, a fast upstream, the proxy, a
do-nothing aiohttp + uvloop proxy (the Python ceiling), nginx (the C ceiling) and pgbench
on the proxy's own statements (the database ceiling), drives them with wrk, and prints a
table plus a JSON file under loadtest/results/. Only ratios within one run mean anything:
the machine is shared and absolute numbers drift.
"""
