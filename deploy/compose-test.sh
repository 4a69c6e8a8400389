#!/usr/bin/env bash
# `make compose-test`: docker-compose.yml built and run for real with podman, checked, torn down.
# For a Debian bookworm machine with no Docker engine and no docker.io (run as root):
#
#   setup     apt-get installs what is missing (podman, runc, podman-compose, debootstrap, ...); podman
#             runs with runc and nofile/nproc ulimits of 4096 (a containers.conf in WORK, CONTAINERS_CONF)
#   base      localhost/splitserve-base:bookworm from debootstrap (python3, python3-venv,
#             ca-certificates) and `podman import`; made once, kept
#   build     deploy/images/local/ gets the local CPU torch wheel (found through pip's find-links) and
#             pip's CA bundle; podman-compose builds every image (docker-compose.yml plus
#             deploy/compose.local.yml, `--network host --format docker`) from a snapshot of the
#             working tree, so that all images see the same sources
#   up        Redis, the two schedulers, then the gateway, prefill and decode, each waited for until healthy
#             (podman-compose 1.0.3 ignores depends_on conditions, and podman runs health checks from
#             systemd timers, absent here: this script runs them), then the gateway's /ready
#   chat      a chat request through the gateway (model from /v1/models, temperature 0), answer checked
#   failover  one scheduler leads, the other stands by; the leader is killed (SIGKILL); the other leads
#             within 20 s and a request completes; the killed one comes back as a standby
#   scale     prefill scaled to 2: the second server registers (the scheduler's ClusterState) and both
#             serve some of a burst of requests (their own logs)
#   redis     the prefill servers are killed, so a request sent now waits in the Redis stream (pending
#             in the scheduler's group); Redis restarts (the entry is still there: AOF on the volume);
#             the prefill servers start again; the request completes with a proper answer
#   down      podman-compose down -v and whatever else carries the project's label; always (trap)
#
# Environment: COMPOSE_TEST_PROJECT (splitserve-ctest), COMPOSE_TEST_WORKDIR (logs, the snapshot,
# containers.conf; default /tmp/splitserve-compose-test), BASE_IMAGE, GATEWAY_HTTP_PORT and
# GATEWAY_GRPC_PORT (8000 and 50051 when free, else free ones), COMPOSE_TEST_KEEP=1 (leave the
# cluster up). Prints the elapsed time of each phase and in total; exits 0 only when every check passed.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROJECT=${COMPOSE_TEST_PROJECT:-splitserve-ctest}
WORK=${COMPOSE_TEST_WORKDIR:-${TMPDIR:-/tmp}/splitserve-compose-test}
LOGS=$WORK/logs
CTX=$WORK/context
LOCAL=$ROOT/deploy/images/local
CLIENT=$ROOT/deploy/compose_client.py
TORCH_VERSION=2.13.0
PROMPT="What is the capital of France? Answer in one sentence."
export BASE_IMAGE=${BASE_IMAGE:-localhost/splitserve-base:bookworm}
export PREFILL_REPLICAS=1

# -- output, phases, failure ---------------------------------------------------------------------

START=$SECONDS
PHASE="" PHASE_START=0 RESULT=FAIL
TIMES=()

log() { printf '[compose-test %4ds] %s\n' $((SECONDS - START)) "$*"; }
indent() { sed 's/^/    /'; }

phase() {  # phase NAME WHAT: ends the phase before
    end_phase
    PHASE=$1 PHASE_START=$SECONDS
    log "== $1: $2"
}

end_phase() {
    if [ -n "$PHASE" ]; then
        TIMES+=("$(printf '%-6s %5d s' "$PHASE" $((SECONDS - PHASE_START)))")
        log "   $PHASE took $((SECONDS - PHASE_START)) s"
    fi
    PHASE=""
}

fail() {  # fail MESSAGE [LOGFILE]
    log "FAILED: $1"
    if [ -n "${2:-}" ] && [ -f "$2" ]; then
        log "last lines of $2:"
        tail -n 40 "$2" | indent
    fi
    exit 1
}

# podman without systemd logs an error for every health-check timer it cannot create; drop that noise.
quiet() { grep -av -e 'unable to get systemd connection' -e 'failed to connect to syslog' || true; }

container() { echo "${PROJECT}_$1_${2:-1}"; }  # podman-compose's container names

compose() {  # podman-compose on the snapshot, with the offline override
    (cd "$CTX" && podman-compose -p "$PROJECT" -f docker-compose.yml -f deploy/compose.local.yml "$@")
}

teardown() {
    local status=$?
    set +e
    trap - EXIT INT TERM ERR
    if [ "$status" -ne 0 ] && [ -n "$PHASE" ]; then
        log "phase $PHASE failed"
    fi
    if [ "${COMPOSE_TEST_KEEP:-0}" = 1 ]; then
        end_phase
        log "COMPOSE_TEST_KEEP=1: the cluster stays up (project $PROJECT); tear it down with:"
        log "  cd $CTX && PREFILL_REPLICAS=$PREFILL_REPLICAS podman-compose -p $PROJECT -f docker-compose.yml -f deploy/compose.local.yml down -v"
    elif command -v podman > /dev/null && [ -d "$CTX" ]; then
        phase down "podman-compose down -v"
        for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' 2> /dev/null); do
            podman logs "$c" 2>&1 | quiet > "$LOGS/$c.log"  # what the containers said, before they go
        done
        log "the containers' logs are in $LOGS/"
        compose down -v -t 10 >> "$LOGS/down.log" 2>&1
        # Whatever podman-compose did not know of (a scaled replica after a failure): by label.
        for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' 2> /dev/null); do
            podman rm -f -t 5 "$c" >> "$LOGS/down.log" 2>&1
        done
        for v in $(podman volume ls --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Name}}' 2> /dev/null); do
            podman volume rm -f "$v" >> "$LOGS/down.log" 2>&1
        done
        podman network rm -f "${PROJECT}_default" >> "$LOGS/down.log" 2>&1
        left=$(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' 2> /dev/null)
        [ -z "$left" ] && log "containers, volume and network removed" || log "left behind: $left"
    fi
    end_phase
    [ "$status" -eq 0 ] && RESULT=PASS
    log "phase times:"
    printf '%s\n' "${TIMES[@]}" | indent
    log "total $((SECONDS - START)) s: $RESULT (logs: $LOGS)"
    exit "$status"
}

# -- setup ---------------------------------------------------------------------------------------

setup() {
    phase setup "packages, podman's configuration"
    [ "$(id -u)" -eq 0 ] || fail "run as root (rootful podman, apt-get, debootstrap): sudo make compose-test"
    mkdir -p "$LOGS"
    local missing=() pkg
    for pkg in podman runc podman-compose debootstrap netavark aardvark-dns iptables curl ca-certificates python3; do
        dpkg-query -W -f '${Status}' "$pkg" 2> /dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } \
            > "$LOGS/apt.log" 2>&1 || fail "apt-get install ${missing[*]}" "$LOGS/apt.log"
    fi
    # runc (not crun), and ulimits a container may set here: podman's defaults exceed the hard limits.
    # DNS: with glibc's defaults (5 s timeout, 2 attempts), a lookup of "redis" made while the Redis
    # container restarted took 30 s here (aardvark-dns 1.4); the services reconnecting to it then
    # re-subscribed 40-60 s late and missed the replies published meanwhile (a queued request never
    # finished, 2 of 4 tries). With a 1 s timeout and one attempt such a lookup fails at once and the
    # services' own retries find the new Redis within a second (5 of 5 tries).
    cat > "$WORK/containers.conf" << 'EOF'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
dns_options = ["timeout:1", "attempts:1"]

[engine]
runtime = "runc"
EOF
    export CONTAINERS_CONF=$WORK/containers.conf
    log "$(podman --version), runc $(runc --version | sed -n 's/^runc version //p'), $(podman-compose --version 2> /dev/null | grep -i 'podman-compose' | head -n 1)"
}

# -- base image ----------------------------------------------------------------------------------

base_image() {
    phase base "local base image $BASE_IMAGE"
    if podman image exists "$BASE_IMAGE"; then
        log "$BASE_IMAGE exists, kept (podman rmi it to make it again)"
        return
    fi
    [ "$BASE_IMAGE" = localhost/splitserve-base:bookworm ] || fail "BASE_IMAGE=$BASE_IMAGE does not exist"
    local rootfs=$WORK/rootfs
    rm -rf "$rootfs"
    log "debootstrap bookworm (python3, python3-venv, ca-certificates)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian > "$LOGS/debootstrap.log" 2>&1 || fail "debootstrap" "$LOGS/debootstrap.log"
    cat > "$rootfs/etc/apt/sources.list" << 'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" > "$LOGS/import.log" 2>&1 \
        || fail "podman import" "$LOGS/import.log"
    rm -rf "$rootfs"
    log "made $BASE_IMAGE"
}

# -- local files and the build -------------------------------------------------------------------

pip_config() {  # the values pip's configuration gives KEY (e.g. find-links, cert), one per line
    local py
    for py in "$ROOT/.venv/bin/python" python3; do
        if "$py" -m pip --version > /dev/null 2>&1; then
            "$py" -m pip config list 2> /dev/null | sed -n "s/^[^=]*\.$1='\(.*\)'\$/\1/p" | tr ' ' '\n'
            return
        fi
    done
}

local_files() {
    mkdir -p "$LOCAL"
    # The CPU torch wheel `pip install torch==$TORCH_VERSION` takes here: in a find-links folder.
    local wheel="" dir
    for dir in $(pip_config find-links) ${PIP_FIND_LINKS:-}; do
        dir=${dir#file://}
        [ -d "$dir" ] || continue
        wheel=$(ls "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-cp311-*linux*_x86_64.whl 2> /dev/null | head -n 1) || true
        [ -n "$wheel" ] && break
    done
    if [ -n "$wheel" ]; then
        cmp -s "$wheel" "$LOCAL/$(basename "$wheel")" || cp "$wheel" "$LOCAL/"
        export TORCH_PIP_ARGS="/build/local/$(basename "$wheel")"
        log "torch: $wheel, passed as $TORCH_PIP_ARGS"
    else
        unset TORCH_PIP_ARGS  # the compose file's default: the CPU wheel from download.pytorch.org
        log "torch: no local torch-$TORCH_VERSION+cpu cp311 wheel in pip's find-links; the images pip install it from download.pytorch.org"
    fi
    # pip in the builds trusts the bundle pip trusts here (a TLS-inspecting proxy's CA), else the system's.
    local cert
    cert=$(pip_config cert | head -n 1)
    cert=${cert:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
    [ -f "$cert" ] || fail "no CA bundle at $cert"
    cmp -s "$cert" "$LOCAL/ca.pem" || cp "$cert" "$LOCAL/ca.pem"
    log "CA bundle: $cert, passed as PIP_CERT=/build/local/ca.pem"
}

snapshot() {  # the build context and compose files, frozen: later edits to the tree do not leak in
    rm -rf "$CTX"
    mkdir -p "$CTX"
    (cd "$ROOT" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - .dockerignore pyproject.toml README.md \
        docker-compose.yml splitserve services deploy/images deploy/compose.local.yml) | tar -C "$CTX" -xf -
    # The secrets the compose file mounts, fresh for this run (the snapshot is the compose project).
    sh "$ROOT/deploy/make-secrets.sh" "$CTX/deploy/secrets" | indent
    export SPLITSERVE_API_KEY_FILE=$CTX/deploy/secrets/api-key  # compose_client.py sends it
    log "snapshot of the working tree at $(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo '?')$(
        [ -n "$(git -C "$ROOT" status --porcelain -- splitserve services deploy docker-compose.yml pyproject.toml 2> /dev/null)" ] \
        && echo ' plus uncommitted changes') in $CTX"
}

build() {
    phase build "images (podman-compose build, --network host --format docker)"
    local_files
    snapshot
    local svc t image
    for svc in redis scheduler gateway prefill decode; do
        t=$SECONDS
        compose --podman-build-args '--network host --format docker' build "$svc" > "$LOGS/build-$svc.log" 2>&1 \
            || fail "building $svc" "$LOGS/build-$svc.log"
        image=$(sed -n 's/^Successfully tagged //p' "$LOGS/build-$svc.log" | tail -n 1)
        # podman-compose 1.0.3 exits 0 when podman build fails: no tagged image is the failure.
        [ -n "$image" ] || fail "building $svc" "$LOGS/build-$svc.log"
        log "built $svc: $image, $(podman image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'), $((SECONDS - t)) s"
    done
    # What the issue asks of every image: a non-root user, a health check, `splitserve <role>`, no torch
    # in the gateway's and the scheduler's.
    for svc in scheduler gateway prefill decode; do
        image=$(sed -n 's/^Successfully tagged //p' "$LOGS/build-$svc.log" | tail -n 1)
        local user health cmd
        user=$(podman image inspect -f '{{.Config.User}}' "$image")
        health=$(podman image inspect -f '{{if .Config.Healthcheck}}{{join .Config.Healthcheck.Test " "}}{{end}}' "$image")
        cmd=$(podman image inspect -f '{{join .Config.Entrypoint " "}} {{join .Config.Cmd " "}}' "$image")
        [ -n "$user" ] && [ "$user" != 0 ] && [ "$user" != root ] || fail "$image runs as root"
        [ -n "$health" ] || fail "$image has no HEALTHCHECK"
        [ "$cmd" = "splitserve-entrypoint $svc" ] || fail "$image starts '$cmd', not 'splitserve-entrypoint $svc'"
        log "  $svc: user $user, health check '$health', starts '$cmd' (splitserve $svc)"
    done
    for svc in scheduler gateway; do
        podman run --rm --entrypoint python "splitserve/$svc:0.1.0" -c \
            "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" 2>&1 | quiet \
            || fail "the $svc image carries torch"
    done
    log "  gateway and scheduler: no torch"
}

# -- the cluster ---------------------------------------------------------------------------------

pick_ports() {
    port_free() { ! (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }
    free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
    if [ -z "${GATEWAY_HTTP_PORT:-}" ]; then
        port_free 8000 && GATEWAY_HTTP_PORT=8000 || GATEWAY_HTTP_PORT=$(free_port)
    fi
    if [ -z "${GATEWAY_GRPC_PORT:-}" ]; then
        port_free 50051 && GATEWAY_GRPC_PORT=50051 || GATEWAY_GRPC_PORT=$(free_port)
    fi
    export GATEWAY_HTTP_PORT GATEWAY_GRPC_PORT
    URL=http://127.0.0.1:$GATEWAY_HTTP_PORT
}

wait_healthy() {  # wait_healthy CONTAINER TIMEOUT_S: runs its health check until it passes
    local c=$1 deadline=$((SECONDS + $2)) t=$SECONDS
    until podman healthcheck run "$c" > /dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            log "$c not healthy after $2 s ($(podman inspect -f '{{.State.Status}}, restarts: {{.RestartCount}}' "$c" 2>&1)); its last lines:"
            podman logs --tail 30 "$c" 2>&1 | quiet | indent
            return 1
        fi
        sleep 2
    done
    log "$c healthy ($((SECONDS - t)) s)"
}

restarts() { podman inspect -f '{{.Name}}={{.RestartCount}}' "$@" 2> /dev/null | tr '\n' ' ' || true; }

up() {
    phase up "podman-compose up -d (project $PROJECT)"
    pick_ports
    # Leftovers of an earlier run that could not clean up.
    if [ -n "$(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT")" ]; then
        log "removing an earlier run's containers"
        compose down -v -t 5 > "$LOGS/down-before.log" 2>&1 || true
        podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman rm -f >> "$LOGS/down-before.log" 2>&1
    fi
    # In depends_on order, each once what it depends on is healthy (what compose's service_healthy does).
    compose up -d --no-build redis > "$LOGS/up.log" 2>&1 || fail "podman-compose up redis" "$LOGS/up.log"
    wait_healthy "$(container redis)" 60 || fail "redis did not become healthy"
    compose up -d --no-build scheduler scheduler-b >> "$LOGS/up.log" 2>&1 || fail "podman-compose up the schedulers" "$LOGS/up.log"
    wait_healthy "$(container scheduler)" 90 || fail "the scheduler did not become healthy"
    wait_healthy "$(container scheduler-b)" 90 || fail "the standby scheduler did not become healthy"
    compose up -d --no-build >> "$LOGS/up.log" 2>&1 || fail "podman-compose up" "$LOGS/up.log"
    wait_healthy "$(container gateway)" 120 || fail "the gateway did not become healthy"
    wait_healthy "$(container prefill)" 600 || fail "the prefill server did not become healthy"
    wait_healthy "$(container decode)" 600 || fail "the decode server did not become healthy"
    python3 "$CLIENT" wait-ready "$URL" 120 || fail "the gateway is not ready"
    log "gateway ready: $URL (gRPC on port $GATEWAY_GRPC_PORT)"
    podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}  {{.Image}}  {{.Status}}  {{.Ports}}' | indent
}

chat() {
    phase chat "a chat request through the gateway"
    MODEL=$(python3 "$CLIENT" model "$URL") || fail "GET /v1/models"
    log "model: $MODEL; POST /v1/chat/completions, temperature 0, max_tokens 16: \"$PROMPT\""
    FIRST=$(python3 "$CLIENT" chat "$URL" "$MODEL" "$PROMPT" --max-tokens 16) || fail "chat: $FIRST"
    log "answer: $FIRST"
    KEYCHECK=$(python3 "$CLIENT" refuses-without-key "$URL" 2>&1) || fail "the gateway and its API key: $KEYCHECK"
    log "the gateway: $KEYCHECK"
    # Redis asks for its password; the scheduler refuses a call without the cluster token.
    local answer
    answer=$(podman exec "$(container redis)" redis-cli XLEN splitserve:requests 2>&1 || true)
    [[ $answer == *NOAUTH* ]] || fail "Redis answered a client without its password: $answer"
    log "Redis: NOAUTH without the password"
    answer=$(cluster_state no-token 2>&1 || true)
    [[ $answer == *UNAUTHENTICATED* ]] || fail "the scheduler answered a call without the cluster token: $answer"
    log "scheduler: UNAUTHENTICATED without the cluster token"
}

cluster_state() {  # the schedulers' ClusterState, asked from the gateway's container (with its cluster
    # token; "no-token" to ask without): the leader's workers (role id address state), or with
    # "leaders" each scheduler's address and whether it leads
    podman exec "$(container gateway)" python -c '
import os, sys, grpc
from splitserve.v1 import scheduler_pb2 as s, scheduler_pb2_grpc as g
token = open(os.environ["SPLITSERVE_CLUSTER_TOKEN_FILE"]).read().strip()
metadata = () if sys.argv[1:] == ["no-token"] else (("x-splitserve-cluster-token", token),)
states = {}
for address in os.environ["SPLITSERVE_SCHEDULER"].split(","):
    with grpc.insecure_channel(address) as channel:
        try:
            states[address] = g.SchedulerStub(channel).GetClusterState(s.ClusterStateRequest(), timeout=5,
                                                                       metadata=metadata)
        except grpc.RpcError as exc:
            error = exc.code().name
if sys.argv[1:] == ["leaders"]:
    for address, state in states.items():
        print(address, "leader" if state.leader else "standby", "epoch", state.epoch)
    sys.exit(0)
state = next((st for st in states.values() if st.leader), next(iter(states.values()), None))
if state is None:
    sys.exit(error)
for w in state.workers:
    role = s.WorkerRole.Name(w.worker.role).removeprefix("WORKER_ROLE_").lower()
    print(role, w.worker.instance_id, w.worker.grpc_address, "draining" if w.draining else "serving")
' "$@" 2>&1 | quiet
}

failover() {
    phase failover "kill -9 of the leading scheduler"
    local leaders leader killed other deadline t
    leaders=$(cluster_state leaders) || fail "the schedulers: $leaders"
    echo "$leaders" | indent
    leader=$(awk '$2 == "leader" {print $1}' <<< "$leaders")
    [ "$(grep -c ' leader ' <<< "$leaders")" = 1 ] && [ "$(grep -c ' standby ' <<< "$leaders")" = 1 ] \
        || fail "not one leader and one standby"
    killed=${leader%%:*} other=$([ "$killed" = scheduler ] && echo scheduler-b || echo scheduler)
    t=$SECONDS
    podman kill -s KILL "$(container "$killed")" 2>&1 | quiet > /dev/null
    deadline=$((SECONDS + 20))
    until grep -q "^$other:.* leader " <<< "$(cluster_state leaders 2> /dev/null)"; do
        [ $SECONDS -lt $deadline ] || fail "$other did not take over within 20 s"
        sleep 1
    done
    log "$killed killed; $other leads $((SECONDS - t)) s later"
    python3 "$CLIENT" chat "$URL" "$MODEL" "$PROMPT" --max-tokens 16 > "$WORK/failover.txt" 2>&1 \
        || fail "a request after the failover: $(cat "$WORK/failover.txt")"
    log "a request after the failover: $(cat "$WORK/failover.txt")"
    compose up -d --no-build "$killed" >> "$LOGS/up.log" 2>&1 || fail "podman-compose up $killed" "$LOGS/up.log"
    wait_healthy "$(container "$killed")" 90 || fail "$killed did not come back"
    leaders=$(cluster_state leaders) || fail "the schedulers: $leaders"
    grep -q "^$killed:.* standby " <<< "$leaders" || { echo "$leaders" | indent; fail "$killed is not the standby"; }
    log "$killed back, standing by"
}

served() {  # requests a prefill container served: its KV blocks freed once the decode server took them
    podman logs "$1" 2>&1 | grep -c 'kv blocks freed' || true
}

scale() {
    phase scale "prefill scaled to 2"
    export PREFILL_REPLICAS=2  # deploy.replicas in compose.local.yml; --scale for podman-compose versions that know it
    compose up -d --no-build --scale prefill=2 prefill > "$LOGS/scale.log" 2>&1 || fail "podman-compose up prefill=2" "$LOGS/scale.log"
    local p1 p2
    p1=$(container prefill 1) p2=$(container prefill 2)
    podman container exists "$p2" || fail "no second prefill container $p2" "$LOGS/scale.log"
    log "$p2: $(podman inspect -f '{{index .Config.Labels "com.docker.compose.service"}} service, image {{.ImageName}}' "$p2")"
    wait_healthy "$p2" 600 || fail "the second prefill server did not become healthy"
    local deadline=$((SECONDS + 60)) state
    while :; do
        state=$(cluster_state) || true  # a failed ask (printed below) is asked again
        [ "$(grep -c '^prefill .* serving$' <<< "$state")" -ge 2 ] && break
        [ $SECONDS -lt $deadline ] || { echo "$state" | indent; fail "the scheduler does not list 2 prefill servers"; }
        sleep 2
    done
    log "the scheduler's ClusterState (role, instance, address):"
    echo "$state" | indent
    local before1 before2 round
    before1=$(served "$p1") before2=$(served "$p2")
    for round in 1 2 3; do
        log "8 chat requests at once (round $round)"
        python3 "$CLIENT" burst "$URL" "$MODEL" 8 --max-tokens 16 || fail "a request of the burst failed"
        sleep 1
        n1=$(($(served "$p1") - before1)) n2=$(($(served "$p2") - before2))
        log "served since the scale-up: $p1 $n1, $p2 $n2"
        [ "$n1" -gt 0 ] && [ "$n2" -gt 0 ] && return
    done
    fail "one prefill server took no work"
}

redis_stream() {  # the request stream: its length, its entries, and what the schedulers' group holds
    local redis
    redis=$(container redis)
    rcli() { podman exec "$redis" sh -c 'REDISCLI_AUTH="$(cat /run/secrets/redis_password)" exec redis-cli "$@"' sh "$@" 2>&1 | quiet; }
    printf 'XLEN %s, entries [%s], group: ' "$(rcli XLEN splitserve:requests)" \
        "$(rcli XRANGE splitserve:requests - + | grep -aE '^[0-9]+-[0-9]+$' | paste -sd ' ' -)"
    rcli XINFO GROUPS splitserve:requests | paste - - | awk '$1 == "pending" || $1 == "lag" {printf "%s %s, ", $1, $2}'
    printf 'XPENDING by consumer [%s]\n' "$(rcli XPENDING splitserve:requests schedulers | tail -n +4 | paste -sd ' ' -)"
}

redis_restart() {
    phase redis "a request queued before a Redis restart completes"
    local sched redis out before chat_pid attempt p1 p2
    sched=$(container scheduler) redis=$(container redis) p1=$(container prefill 1) p2=$(container prefill 2)
    local all=("$redis" "$sched" "$(container gateway)" "$p1" "$p2" "$(container decode)")
    before=$(restarts "${all[@]}")
    xlen() { podman exec "$redis" sh -c 'REDISCLI_AUTH="$(cat /run/secrets/redis_password)" exec redis-cli XLEN splitserve:requests' 2>&1 | quiet; }
    local base deadline=$((SECONDS + 30))
    # Finished requests are acknowledged and deleted; wait for the last ones (an ack waits out a DNS
    # hiccup while a container starts), so that the stream holds only the request queued below.
    until [ "$(xlen)" = 0 ] || [ $SECONDS -ge $deadline ]; do sleep 1; done
    base=$(xlen) || base=0
    log "stream before: $(redis_stream)"
    out=$WORK/queued.txt
    for attempt in 1 2 3; do
        # Killed (podman stop -t 0: SIGKILL, no drain), the prefill servers take nothing and the
        # scheduler keeps the request queued. Stopped gracefully they would unregister at once, and
        # the gateway refuses requests (503) while no prefill server is registered; killed, they stay
        # listed until the scheduler notices (a refused Submit, or 5 s without heartbeats).
        podman stop -t 0 "$p1" "$p2" 2>&1 | quiet > /dev/null
        log "prefill servers killed; POST /v1/chat/completions in the background"
        python3 "$CLIENT" chat "$URL" "$MODEL" "$PROMPT" --max-tokens 16 --timeout 240 > "$out" 2>&1 &
        chat_pid=$!
        local len=0
        deadline=$((SECONDS + 10))
        while [ $SECONDS -lt $deadline ] && kill -0 "$chat_pid" 2> /dev/null; do
            len=$(xlen) || len=0
            [ "$len" -gt "$base" ] && break
            sleep 0.2
        done
        [ "$len" -gt "$base" ] && break
        log "not queued: $(cat "$out")"
        wait "$chat_pid" || true
        podman start "$p1" "$p2" 2>&1 | quiet > /dev/null
        wait_healthy "$p1" 300 && wait_healthy "$p2" 300 || fail "the prefill servers did not come back"
        python3 "$CLIENT" wait-ready "$URL" 60 || fail "the gateway is not ready again"
        [ "$attempt" -lt 3 ] || fail "could not queue a request with the prefill servers down"
    done
    # The scheduler drops the killed servers (5 s without heartbeats); the request waits in its queue.
    local workers
    deadline=$((SECONDS + 20))
    until workers=$(cluster_state) && ! grep -q '^prefill ' <<< "$workers" || [ $SECONDS -ge $deadline ]; do sleep 1; done
    log "queued: $(redis_stream)"
    log "the scheduler's workers now: $(awk '{printf "%s%s %s", sep, $1, $2; sep=", "}' <<< "$workers")"
    log "podman restart $redis"
    local restarted_at
    restarted_at=$(date -u +%Y-%m-%dT%H:%M:%S)
    podman restart -t 10 "$redis" 2>&1 | quiet > /dev/null
    wait_healthy "$redis" 60 || fail "Redis did not come back"
    log "after the restart: $(redis_stream)"
    [ "$(xlen)" -gt "$base" ] || fail "the queued request is gone from the stream after the restart (AOF?)"
    kill -0 "$chat_pid" 2> /dev/null || fail "the queued request ended during the Redis restart: $(cat "$out")"
    log "podman start $p1 $p2"
    podman start "$p1" "$p2" 2>&1 | quiet > /dev/null
    wait_healthy "$p1" 300 || fail "$p1 did not come back"
    wait_healthy "$p2" 300 || fail "$p2 did not come back"
    log "waiting for the queued request"
    if ! wait "$chat_pid"; then
        log "the queued request failed: $(cat "$out")"
        log "what the services logged about Redis since the restart (down_s: how long each was cut off):"
        local c
        for c in "${all[@]:1}"; do
            podman logs --since "$restarted_at" "$c" 2>&1 | grep -a -e 'redis unreachable' -e 'redis reconnected' \
                | sed "s/^/$c: /" | cut -c1-240 | indent
        done
        fail "the queued request did not complete after the Redis restart"
    fi
    log "answer: $(cat "$out")"
    local first=${FIRST#*: } second
    second=$(cat "$out")
    second=${second#*: }
    [ "$first" = "$second" ] && log "the same answer as the first request's (temperature 0)" \
        || log "note: not the first request's answer: $first"
    sleep 1
    log "stream after: $(redis_stream)"
    local after
    after=$(restarts "${all[@]}")
    log "restart counts (restart policy) before: $before"
    log "restart counts (restart policy) after:  $after"
    [ "$before" = "$after" ] || log "NOTE: a container died and its restart policy brought it back"
    python3 "$CLIENT" chat "$URL" "$MODEL" "$PROMPT" --max-tokens 16 > "$out" 2>&1 || fail "a request after the restart: $(cat "$out")"
    log "a new request after the restart: $(cat "$out")"
}

main() {
    # A command that fails outside a check says which (not inside $(...), where failing is often fine).
    trap 'status=$?; [ "$BASH_SUBSHELL" -ne 0 ] || log "FAILED: \"$BASH_COMMAND\" exited $status (line $LINENO)"' ERR
    trap teardown EXIT
    trap 'exit 130' INT TERM
    setup
    base_image
    build
    up
    chat
    failover
    scale
    redis_restart
}

main "$@"
