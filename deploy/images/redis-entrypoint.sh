#!/bin/sh
# Containerfile.redis-local's entrypoint. Started with no config file, redis-server is in protected
# mode and refuses every client but loopback; the official image builds Redis with protected mode off
# for that reason, Debian's package does not, so turn it off here (the compose network is private:
# only the gateway publishes ports).
set -eu
if [ "${1:-}" = redis-server ]; then
    set -- "$@" --protected-mode no
fi
exec "$@"
