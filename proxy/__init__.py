"""idemproxy: an idempotency reverse proxy backed by PostgreSQL."""

__version__ = "0.1.0"
