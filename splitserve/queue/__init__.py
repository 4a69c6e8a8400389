"""Redis plumbing: the request stream, pub/sub channels, and a private redis-server for local runs."""
