#!/bin/sh
# The images' entrypoint: `splitserve "$@"`, e.g. `splitserve prefill`, configured by SPLITSERVE_*.
#
# SPLITSERVE_HOST=auto binds the service to this container's own address (what its hostname resolves
# to in /etc/hosts). A worker advertises the address it binds to, to the scheduler and, for KV pulls,
# to decode servers; bound to 0.0.0.0 it would advertise its hostname instead, which other containers
# may not resolve (Kubernetes pods of a Deployment: never).
set -eu
if [ "${SPLITSERVE_HOST:-}" = auto ]; then
    SPLITSERVE_HOST=$(python -c 'import socket; print(socket.gethostbyname(socket.gethostname()))')
    case "$SPLITSERVE_HOST" in
        127.*) echo "SPLITSERVE_HOST=auto: $(hostname) resolves to $SPLITSERVE_HOST, a loopback address" \
                    "other containers cannot reach; set SPLITSERVE_HOST to this container's address" >&2
               exit 1 ;;
    esac
    export SPLITSERVE_HOST
fi
exec splitserve "$@"
