"""The HTTP layer: the app factory, server, middleware, routes and protocols; the only layer
that knows the web framework."""
