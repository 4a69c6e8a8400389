#!/bin/bash
# The bare gRPC hand-off after 0.3 s idle under grpc's own settings, in turn with none.
# Run from the repository root: bash docs/figures/overhead-zen4/2026-12-07b/grpc-settings.sh
for e in "" "-event_engine_callback_cq" "pollset_alternative" "" "-event_engine_poller"; do
  echo "== GRPC_EXPERIMENTS='$e'"
  GRPC_EXPERIMENTS=$e .venv/bin/python scripts/hop-floor.py --samples 40 --gap 0.3 | grep gRPC
done
echo "== GRPC_ASYNCIO_ENGINE=custom_io_manager"
GRPC_ASYNCIO_ENGINE=custom_io_manager .venv/bin/python scripts/hop-floor.py --samples 40 --gap 0.3 2>&1 | tail -2
