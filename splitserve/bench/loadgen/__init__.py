"""`splitserve bench serve`: an open-loop load generator for any OpenAI-compatible server.

Pure parts (no I/O), reusable by a simulator or planner: `workloads` (request lengths), `arrivals`
(arrival times), `prompts`, `records` and `metrics` (the report), `sweep` (goodput over rates).
I/O parts: `client` (HTTP/SSE and gRPC), `run` (the command), `plot` (PNG figures).
"""
