"""Observability: logs, metrics and the per-request context."""
