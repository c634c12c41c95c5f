"""The flow of a guarded request: identify, claim, decide (pure), execute, deliver and
record, complete, replay; the per-request context, leases and the replay cache."""
