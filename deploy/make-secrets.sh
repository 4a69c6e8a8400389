#!/usr/bin/env sh
# `make secrets`: the secrets docker-compose.yml mounts, made once with fresh random values:
#
#   deploy/make-secrets.sh [DIR]     DIR defaults to deploy/secrets (git ignores it)
#
#   DIR/redis-password   Redis's requirepass; every service AUTHs with it
#   DIR/cluster-token    the token every internal gRPC call carries (splitserve's cluster identity)
#   DIR/api-key          the key clients send the gateway (Authorization: Bearer KEY)
#
# An existing file is kept (rotate one by deleting it and restarting the services). The folder is
# readable by its owner only; the files inside are world-readable because compose bind-mounts them
# into containers whose users (10001, redis) are not the host's owner.
set -eu
dir=${1:-$(dirname "$0")/secrets}
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
for name in redis-password cluster-token api-key; do
    if [ ! -s "$dir/$name" ]; then
        # 32 random bytes, base64url without padding: 43 characters, valid in URLs and gRPC metadata.
        head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' > "$dir/$name"
        echo "made $dir/$name"
    fi
    chmod 644 "$dir/$name"
done
