"""Moving a prefilled request's KV blocks from a prefill server to a decode server.

Two transports behind one small interface (``base.py``): UCX peer-to-peer (``ucx.py``) and gRPC
server streaming (``grpc.py``) for platforms without UCX.
"""
