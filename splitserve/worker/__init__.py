"""Running an engine inside a service: the engine thread and the worker plumbing shared by prefill and decode."""
