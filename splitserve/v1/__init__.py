"""Generated protobuf and gRPC code for ``protos/splitserve/v1`` (``make proto``; do not edit)."""
