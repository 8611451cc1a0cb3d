"""ASGI middleware: request ids and access logs, the headers-first gate, the body limit."""
