"""`splitserve up`: a whole local cluster (Redis, scheduler, prefill and decode servers, gateway).

`--mode colocated` (and `chunked`, `layered`) starts colocated workers instead of prefill and decode
servers: the baseline behind the same gateway, scheduler and stream. `--mode auto` starts the placement the
planner predicts serves the most goodput for the SLOs and workload given (auto.py). Workers get
their own CPU cores: the cores in --cpus (default: all this process may use) are split evenly
among them, each pinned to its share with one torch thread per core, so a colocated worker gets all
the cores that the prefill and decode servers of a disaggregated cluster share. The gateway, the
scheduler and Redis float.

Every service is a fresh process (never a fork: UCX must not be initialized before a fork), each
with its own log file, and each dies with the launcher even when the launcher is killed
(splitserve/common/proc.py). The launcher waits until the gateway is ready, prints the endpoints,
serves until Ctrl-C or SIGTERM, then stops the services in reverse order of their start. A
service that exits on its own meanwhile is restarted with the same flags after a backoff.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import NoReturn

from splitserve.bench.loadgen.config import add_length_args
from splitserve.common.auth import (
    API_KEY_ENV,
    API_KEY_FILE_ENV,
    REDIS_PASSWORD_ENV,
    REDIS_PASSWORD_FILE_ENV,
    REDIS_USERNAME_ENV,
    TLS_DIR_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    ClusterAuth,
    RedisCredentials,
    add_api_key_args,
    add_cluster_auth_args,
    add_redis_auth_args,
    api_key_from_args,
    cluster_auth_from_args,
    new_token,
    redis_credentials_from_args,
    warn_if_open,
)
from splitserve.common.certs import load_cluster_tls, write_cluster_certs
from splitserve.common.engine_args import add_engine_args, format_cpus, positive_float, positive_int
from splitserve.common.logging import ERROR_PREFIX
from splitserve.common.net import free_port
from splitserve.common.proc import RestartPolicy, Supervised, exit_reason, log_size, owned
from splitserve.common.tracing import add_tracing_args
from splitserve.queue.redis_server import LocalRedis
from splitserve.worker.config import check_kv_lease

from . import adapt

ENGINE_FLAGS = ("model", "dtype", "device", "block_size", "kv_cache_gb", "token_budget", "max_num_seqs",
                "max_model_len")
SIMULATED_MODES = ("disaggregated", "colocated", "chunked", "layered")  # the planner's Mode (tested equal)
MODES = (*SIMULATED_MODES, "auto")
WORKER_ROLES = ("prefill", "decode", "colocated")
DEFAULT_CHUNK_SIZE = 256  # measured (1,024-token prompt, 2 threads): 128-token chunks cost ~18% more, 256 ~6%
DEFAULT_PREFILL_SLICE_MS = 30.0  # layered prefill: a decode step every ~30 ms of a prompt's pass


@dataclass(frozen=True)
class ClusterConfig:
    num_prefill: int
    num_decode: int
    host: str
    http_port: int
    grpc_port: int
    scheduler_ports: tuple[int, ...]  # the first one's leads at start; the others stand by
    redis_url: str | None  # None: start a private redis-server
    kv_transport: str
    log_dir: Path
    threads_per_worker: int | None  # None: one per core of the worker's share
    engine_argv: tuple[str, ...]
    gateway_argv: tuple[str, ...]
    ready_timeout_s: float
    # Every internal call carries its token: a fresh one per run unless one is given (env or file);
    # with --cluster-tls, up's own certificate (admin) too. NO_AUTH only with --insecure-cluster.
    cluster_auth: ClusterAuth
    api_key: str | None = None
    num_colocated: int = 0
    chunk_size: int | None = None  # colocated workers: chunked prefill
    prefill_slice_ms: float | None = None  # colocated workers: layered prefill
    # CPU cores of each worker, in the order of worker_names; pinned unless pin is False.
    worker_cpus: tuple[tuple[int, ...], ...] = ()
    pin: bool = True
    tls_dir: Path | None = None  # --cluster-tls: the CA and one folder per role (certs.py)
    # What the services AUTH to Redis with: given, or for up's private Redis a fresh password per run.
    redis_credentials: RedisCredentials = RedisCredentials()
    own_certs: bool = False  # tls_dir was made for this run, and goes with it
    drain_timeout_s: float = 30.0  # on stop, what the scheduler and workers get to finish their work
    kv_lease_s: float = 30.0  # prefill servers: how long held KV blocks outlive the leader's silence
    cpus: tuple[int, ...] = ()  # every core the workers may use (--cpus, or all)
    scheduler_argv: tuple[str, ...] = ()  # planning flags (--adapt)
    decode_prefix_caching: bool = True  # decode servers keep finished requests' blocks for the next turn
    adapt: bool = False  # follow the scheduler's placement recommendations
    adapt_cooldown_s: float = 60.0
    restart: RestartPolicy = RestartPolicy()  # for services that exit on their own
    more_gateways: tuple[tuple[int, int], ...] = ()  # (HTTP, gRPC) ports of gateway-1, gateway-2, ...
    otlp_endpoint: str | None = None  # every service's request spans go to this collector

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def worker_names(self) -> list[str]:
        return ([f"prefill-{i}" for i in range(self.num_prefill)] + [f"decode-{i}" for i in range(self.num_decode)]
                + [f"colocated-{i}" for i in range(self.num_colocated)])

    def describe(self) -> str:
        if self.num_colocated:
            how = (f"chunked prefill, chunks of {self.chunk_size} tokens" if self.chunk_size
                   else f"layered prefill, slices of {self.prefill_slice_ms:g} ms" if self.prefill_slice_ms
                   else "prefill first")
            return f"{self.num_colocated} colocated worker(s) ({how})"
        return f"{self.num_prefill} prefill + {self.num_decode} decode servers"


def _plan_placement(args: argparse.Namespace) -> None:
    """--mode auto: plan on the launcher's cores, say what was chosen, and set the flags to it."""
    from . import auto  # the planner loads only for --mode auto

    if args.chunk_size or args.prefill_slice_ms:
        raise ValueError("--mode auto chooses the mode: --chunk-size applies to --mode chunked, "
                         "--prefill-slice-ms to --mode layered")
    cpus = args.cpus or sorted(os.sched_getaffinity(0))
    print(f"planning the placement for {len(cpus)} core(s) ...", flush=True)
    choice = auto.choose(args, len(cpus))
    print(choice.describe(), flush=True)
    auto.apply(choice, args)
    args.cpus = cpus[:choice.placement.resources]  # a placement may leave cores unused


def split_cpus(cpus: list[int], num_workers: int) -> list[list[int]]:
    """Give each worker its own contiguous share of cpus; earlier workers get any remainder.

    With fewer cores than workers, workers share cores round-robin (one core each).
    """
    if num_workers > len(cpus):
        return [[cpus[i % len(cpus)]] for i in range(num_workers)]
    share, extra = divmod(len(cpus), num_workers)
    shares, start = [], 0
    for i in range(num_workers):
        size = share + (i < extra)
        shares.append(cpus[start:start + size])
        start += size
    return shares


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a local cluster and serve until Ctrl-C",
                       description="Start Redis (unless --redis-url), the scheduler, prefill and decode "
                                   "servers and the gateway as separate processes; wait until the cluster "
                                   "is ready; serve until Ctrl-C or SIGTERM; stop everything. A service "
                                   "that exits on its own (a crash, a kill) is restarted with the same name, "
                                   "flags and cores, after 1 s, doubling for crashes in a row up to 30 s "
                                   "(back to 1 s once it has stayed up for 60 s); one that exits during "
                                   "start-up stops the launcher instead. Every service dies with the "
                                   "launcher, even when the launcher is killed.")
    p.add_argument("--mode", choices=MODES, default="disaggregated",
                   help="disaggregated: prefill and decode servers; colocated: workers that do both, new "
                        "prompts first (vLLM's order); chunked: colocated with chunked prefill; layered: "
                        "colocated with layered prefill (a prompt's pass runs a few layer parts at a time, with "
                        "the running sequences' decode steps between, --prefill-slice-ms); auto: the "
                        "placement (mode, workers, cores, token budget, batch limit) the planner predicts "
                        "serves the most goodput for --ttft-slo, --tpot-slo and the --workload or lengths "
                        "given (default: disaggregated)")
    p.add_argument("--prefill", type=positive_int, default=1, help="prefill servers (default: 1)")
    p.add_argument("--decode", type=positive_int, default=1, help="decode servers (default: 1)")
    p.add_argument("--colocated", type=positive_int, default=1,
                   help="colocated workers, in the colocated, chunked and layered modes (default: 1)")
    p.add_argument("--routing", choices=("kv", "least-loaded"), default="kv",
                   help="the scheduler's prefill placement: kv (default) the server with the least "
                        "expected time to the first token given its cached prefix, queue and load; "
                        "least-loaded the fewest prompt tokens queued")
    p.add_argument("--no-decode-prefix-caching", action="store_true",
                   help="decode servers keep no finished request's blocks, so each turn of a conversation "
                        "pulls its whole prompt (measures what decode-side reuse saves; default: they keep "
                        "them)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin workers to cores (they still get one torch thread per core of their share)")
    p.add_argument("--host", default="127.0.0.1", help="address every service binds (default: 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000, help="gateway HTTP port (default: 8000)")
    p.add_argument("--grpc-port", type=int, default=50051, help="gateway gRPC port (default: 50051)")
    p.add_argument("--scheduler-port", type=int, default=0,
                   help="the (first) scheduler's gRPC port (default: a free one)")
    p.add_argument("--gateways", type=positive_int, default=1,
                   help="gateways to run, each its own process and reply stream (the first on --http-port and "
                        "--grpc-port, the others on free ports; default: 1)")
    p.add_argument("--schedulers", type=positive_int, default=1,
                   help="schedulers to run: one leads (a lease in Redis), the others stand by and take over "
                        "within a few seconds should it die (default: 1)")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting a private one "
                                                      "(its password from --redis-password-file or the environment)")
    add_redis_auth_args(p)
    p.add_argument("--kv-transport", choices=("ucx", "grpc"), default="ucx",
                   help="how KV blocks move from prefill to decode (default: ucx)")
    p.add_argument("--log-dir", default=None, help="folder for the services' logs (default: a new temp folder)")
    p.add_argument("--threads-per-worker", type=positive_int, default=None,
                   help="torch threads per worker (default: one per core of its share of --cpus)")
    add_api_key_args(p)  # the gateway gets the key through its environment, never its command line
    add_cluster_auth_args(p, tls_dir=False)
    p.add_argument("--cluster-tls", nargs="?", const="", default=None, metavar="DIR",
                   help="mutual TLS between the services too (each internal method taken only from the "
                        "roles that call it; gRPC KV encrypted), with a CA and certificates made for this "
                        "run, or those of DIR (what `splitserve certs --out DIR` wrote)")
    p.add_argument("--insecure-cluster", action="store_true",
                   help="no cluster token and no certificates: any local process may call the internal "
                        "services. Only to measure what authentication costs, never on a shared host")
    p.add_argument("--max-pending", type=positive_int, default=None,
                   help="requests in flight at the gateway before it answers 429 (default: the gateway's)")
    p.add_argument("--ready-timeout", type=positive_float, default=300.0,
                   help="seconds to wait for the cluster to become ready (default: 300)")
    p.add_argument("--drain-timeout", type=positive_float, default=30.0,
                   help="on SIGTERM a service takes nothing new and gets this many seconds to finish "
                        "what it holds; a worker then hands the rest back (default: 30)")
    p.add_argument("--kv-lease", type=positive_float, default=30.0,
                   help="seconds a prefill server keeps a prefilled request's KV blocks for a pull "
                        "once no leading scheduler's heartbeat answer says it still awaits it; at "
                        "least two heartbeats, 2 s (default: 30)")
    add_tracing_args(p)
    adapt.add_args(p)
    add_length_args(p.add_argument_group("the workload --mode auto plans for (a preset also sets the SLOs)"))
    add_engine_args(p)
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    if args.mode == "auto":
        _plan_placement(args)
    elif args.workload != "fixed" or args.input_len or args.output_len:
        raise ValueError("--workload, --input-len and --output-len are what --mode auto plans for; "
                         "give --mode auto")
    colocated = args.mode != "disaggregated"
    if args.chunk_size and args.mode != "chunked":
        raise ValueError("--chunk-size applies to --mode chunked")
    if args.prefill_slice_ms and args.mode != "layered":
        raise ValueError("--prefill-slice-ms applies to --mode layered")
    check_kv_lease(args.kv_lease)
    num_prefill, num_decode = (0, 0) if colocated else (args.prefill, args.decode)
    num_colocated = args.colocated if colocated else 0
    workers = num_prefill + num_decode + num_colocated
    cpus = args.cpus or sorted(os.sched_getaffinity(0))
    shares = split_cpus(cpus, workers)
    threads = args.threads or args.threads_per_worker
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="splitserve-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.insecure_cluster and (args.cluster_tls is not None or cluster_auth_from_args(args).enabled):
        raise ValueError("--insecure-cluster turns the cluster's credentials off: it takes no token or --cluster-tls")
    if args.redis_url and "@" in args.redis_url.partition("://")[2].partition("/")[0]:
        raise ValueError("--redis-url carries credentials, which every service's command line would show: give "
                         "the password with --redis-password-file or SPLITSERVE_REDIS_PASSWORD instead")
    tls_dir = Path(args.cluster_tls) if args.cluster_tls else None
    if args.cluster_tls == "":
        tls_dir = Path(tempfile.mkdtemp(prefix="splitserve-certs-"))
        write_cluster_certs(tls_dir, keep_ca_key=False)  # removed when up stops
    gateway_argv = [*(["--max-pending", str(args.max_pending)] if args.max_pending else []),
                    *(["--model", args.model] if args.model else [])]
    try:
        return ClusterConfig(
            num_prefill=num_prefill, num_decode=num_decode, host=args.host, http_port=args.http_port,
            grpc_port=args.grpc_port,
            scheduler_ports=(args.scheduler_port or free_port(args.host),
                             *(free_port(args.host) for _ in range(args.schedulers - 1))),
            redis_url=args.redis_url, kv_transport=args.kv_transport, log_dir=log_dir,
            threads_per_worker=threads, engine_argv=tuple(_engine_argv(args)),
            gateway_argv=tuple(gateway_argv), ready_timeout_s=args.ready_timeout,
            cluster_auth=_cluster_auth(args, tls_dir), api_key=api_key_from_args(args),
            num_colocated=num_colocated,
            chunk_size=(args.chunk_size or DEFAULT_CHUNK_SIZE) if args.mode == "chunked" else None,
            prefill_slice_ms=((args.prefill_slice_ms or DEFAULT_PREFILL_SLICE_MS) if args.mode == "layered"
                              else None),
            worker_cpus=tuple(tuple(share) for share in shares), pin=not args.no_pin, tls_dir=tls_dir,
            own_certs=args.cluster_tls == "", redis_credentials=_redis_credentials(args),
            drain_timeout_s=args.drain_timeout, kv_lease_s=args.kv_lease, cpus=tuple(cpus),
            scheduler_argv=("--routing", args.routing, *adapt.scheduler_argv(args, len(cpus))),
            adapt=args.adapt, decode_prefix_caching=not args.no_decode_prefix_caching,
            adapt_cooldown_s=args.adapt_cooldown,
            more_gateways=tuple((free_port(args.host), free_port(args.host)) for _ in range(args.gateways - 1)),
            otlp_endpoint=args.otlp_endpoint)
    except BaseException:  # this run's keys go with it
        if args.cluster_tls == "":
            shutil.rmtree(tls_dir, ignore_errors=True)
        raise


def _redis_credentials(args: argparse.Namespace) -> RedisCredentials:
    """Those given; for up's private Redis, a fresh password when none is given (any local user
    could otherwise read the prompts in its streams, or add requests)."""
    given = redis_credentials_from_args(args)
    if args.redis_url is not None or given.password is not None:
        return given
    if given.username is not None:
        raise ValueError("--redis-username names an ACL user of a Redis given with --redis-url; up's private "
                         "Redis has only its default user")
    return RedisCredentials(None, new_token())


def _cluster_auth(args: argparse.Namespace, tls_dir: Path | None) -> ClusterAuth:
    """The token given (--cluster-token-file, env), else a fresh one for this run (none with
    --insecure-cluster), and with tls_dir up's own certificate, an operator's (admin)."""
    if args.insecure_cluster:
        return ClusterAuth(None)
    token = cluster_auth_from_args(args).token or new_token()
    if tls_dir is None:
        return ClusterAuth(token)
    for role in ("scheduler", "gateway", *WORKER_ROLES):  # each service's folder, checked before any starts
        load_cluster_tls(tls_dir / role)
    return ClusterAuth(token, load_cluster_tls(tls_dir / "admin"))


def _engine_argv(args: argparse.Namespace) -> list[str]:
    argv = []
    for name in ENGINE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv + ([] if args.prefix_caching else ["--no-prefix-caching"])


@dataclass
class Cluster:
    """The processes of one local cluster."""

    config: ClusterConfig
    redis: LocalRedis | None = None
    services: list[Supervised] = field(default_factory=list)
    # Workers told to drain (SIGTERM) while the cluster goes on: --adapt replaced them. Never restarted.
    retiring: list[Supervised] = field(default_factory=list)
    _next_index: dict[str, int] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        return self.config.redis_url or self.redis.url

    def start(self) -> None:
        c = self.config
        if c.redis_url is None:
            self._start_redis()
        common = ["--redis-url", self.redis_url]
        drain = ["--drain-timeout", str(c.drain_timeout_s)]
        for i, port in enumerate(c.scheduler_ports):  # scheduler, scheduler-1, ...: the first leads at start
            self._spawn(f"scheduler-{i}" if i else "scheduler",
                        ["scheduler", *common, *drain, "--host", c.host, "--port", str(port),
                         "--consumer", f"scheduler-{i}", *c.scheduler_argv])
            if i == 0 and len(c.scheduler_ports) > 1:
                time.sleep(0.5)  # so that it takes the lease: the others stand by
        for name, cpus in zip(c.worker_names, c.worker_cpus):
            self.start_worker(name.split("-")[0], cpus)
        gateways = [("gateway", c.http_port, c.grpc_port)]
        gateways += [(f"gateway-{i}", http, grpc) for i, (http, grpc) in enumerate(c.more_gateways, 1)]
        for name, http, grpc in gateways:
            self._spawn(name, ["gateway", *common, "--scheduler", self.scheduler_address, "--host", c.host,
                               "--http-port", str(http), "--grpc-port", str(grpc), *c.gateway_argv])

    def service_env(self, name: str) -> dict[str, str]:
        """A service's environment: secrets go here, never on a command line (readable by any
        local user in /proc), while the environment is readable only by the same user. Every
        service gets the cluster token, its role's certificates and the Redis password; only the
        gateway gets the API key."""
        env = {k: v for k, v in os.environ.items()
               if k not in (TOKEN_ENV, TOKEN_FILE_ENV, TLS_DIR_ENV, API_KEY_ENV, API_KEY_FILE_ENV,
                            REDIS_PASSWORD_ENV, REDIS_PASSWORD_FILE_ENV, REDIS_USERNAME_ENV)}
        redis = self.config.redis_credentials
        if redis.password is not None:
            env[REDIS_PASSWORD_ENV] = redis.password
        if redis.username is not None:
            env[REDIS_USERNAME_ENV] = redis.username
        if self.config.cluster_auth.token is not None:
            env[TOKEN_ENV] = self.config.cluster_auth.token
        if self.config.tls_dir is not None:  # the folder of its role: prefill-1 is a prefill server
            env[TLS_DIR_ENV] = str(self.config.tls_dir / name.split("-")[0])
        if self.config.api_key and name.split("-")[0] == "gateway":
            env[API_KEY_ENV] = self.config.api_key
        return env

    @property
    def scheduler_addresses(self) -> list[str]:
        return [f"{self.config.host}:{port}" for port in self.config.scheduler_ports]

    @property
    def scheduler_address(self) -> str:
        """Every scheduler's, comma-separated, as workers and the gateway take them."""
        return ",".join(self.scheduler_addresses)

    def start_worker(self, role: str, cpus, engine_argv: list[str] = (), threads: int | None = None) -> str:
        """Start a worker of role on cpus (engine_argv overrides the cluster's engine flags, threads
        --threads-per-worker); its name."""
        c = self.config
        index = self._next_index.get(role, 0)
        self._next_index[role] = index + 1
        name = f"{role}-{index}"
        placement = ["--threads", str(threads or c.threads_per_worker or len(cpus))]
        if c.pin:
            placement += ["--cpus", format_cpus(list(cpus))]
        role_flags = ["--chunk-size", str(c.chunk_size)] if c.chunk_size and role == "colocated" else []
        if c.prefill_slice_ms and role == "colocated":
            role_flags += ["--prefill-slice-ms", f"{c.prefill_slice_ms:g}"]
        if role == "decode" and not c.decode_prefix_caching:
            role_flags.append("--no-prefix-caching")
        if role == "prefill":
            role_flags += ["--kv-lease", f"{c.kv_lease_s:g}"]
        self._spawn(name, [role, "--redis-url", self.redis_url, "--drain-timeout", str(c.drain_timeout_s),
                           "--scheduler", self.scheduler_address, "--host", c.host, "--port", "0",
                           "--kv-transport", c.kv_transport, *c.engine_argv, *engine_argv, *placement,
                           *role_flags, "--instance-id", name])
        return name

    def workers(self) -> list[str]:
        return [s.name for s in self.services if s.name.split("-")[0] in WORKER_ROLES]

    def retire(self, name: str) -> None:
        """Drain a worker (SIGTERM) and stop watching it as part of the cluster."""
        for service in [s for s in self.services if s.name == name]:
            self.services.remove(service)
            self.retiring.append(service)
            service.process.send_signal(signal.SIGTERM)  # a no-op for one that already exited

    def reap_retired(self) -> list[tuple[str, int]]:
        """Retired workers that have exited, with their exit codes."""
        gone = [s for s in self.retiring if s.exited]
        for service in gone:
            self.retiring.remove(service)
        return [(s.name, s.process.returncode) for s in gone]

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = self.config.log_dir / f"{name}.log"
        tracing = ["--otlp-endpoint", self.config.otlp_endpoint] if self.config.otlp_endpoint else []
        command = owned([sys.executable, "-m", "splitserve.cli", "--log-json", *argv, *tracing])

        def launch() -> subprocess.Popen:
            with open(log, "ab") as out:  # the child has its own copy of the descriptor
                # A new session: Ctrl-C reaches the launcher only, which then stops the services in order.
                return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=self.service_env(name))

        start = log_size(log)  # before the child writes to it
        self.services.append(Supervised(name, launch, log, launch(), log_start=start))

    def _start_redis(self) -> None:
        # Append-only: a restarted Redis replays the stream, so requests queued in it are not lost.
        self.redis = LocalRedis(appendonly=True, die_with_parent=True,
                                password=self.config.redis_credentials.password).start()

        def launch() -> subprocess.Popen:  # same port and folder (its append-only file); services reconnect
            try:
                self.redis.start()
            except OSError as exc:  # exited at once or never answered: supervise() sees an exit and backs off
                print(f"redis: {exc}", file=sys.stderr, flush=True)
            return self.redis.process

        log = Path(self.redis.dir.name) / "redis.log"
        self.services.append(Supervised("redis", launch, log, self.redis.process))

    def dead(self) -> list[str]:
        return [s.name for s in self.services if s.exited]

    def supervise(self) -> None:
        """Restart each service that exited though nobody asked it to, once its backoff has passed.
        Retired workers are not in `services` any more: a drained worker stays gone."""
        now = time.monotonic()
        for service in self.services:
            if (news := service.tend(self.config.restart, now)) is not None:
                print(news, file=sys.stderr, flush=True)

    def wait_ready(self) -> None:
        """Poll the gateway's readiness (an external process: there is nothing to await). A service
        that exits before the gateway is ready is not restarted: at start-up it is a configuration
        error (a port in use, a bad flag), and repeating it would hide it. Once the gateway is ready
        (with some workers), any exit is a crash that supervise() restarts, even one of a worker
        that had not registered yet."""
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            # Readiness first: a service that exits just after the gateway turned ready (a client may
            # already be using the cluster) is restarted like any later crash, not taken for a bad start.
            if is_ready(self.config.http_url):
                return
            if dead := [s for s in self.services if s.exited]:
                raise OSError("; ".join(f"{s.name} {startup_failure(s)}" for s in dead))
            time.sleep(0.25)
        raise OSError(f"the cluster was not ready after {self.config.ready_timeout_s:.0f} s; "
                      f"see the logs in {self.config.log_dir}")

    def stop(self) -> None:
        """SIGTERM each service, the gateway first, then the workers newest first, then the scheduler
        and Redis: each drains, within its timeout, and exits; one that does not is killed."""
        grace_s = self.config.drain_timeout_s + 30.0  # + a prefill's pull grace, the last reports, gRPC
        order = sorted(reversed(self.services + self.retiring), key=lambda s: not s.name.startswith("gateway"))
        for service in order:
            if not service.exited:
                service.process.send_signal(signal.SIGTERM)
                try:
                    service.process.wait(grace_s)
                except subprocess.TimeoutExpired:
                    service.process.kill()
                    service.process.wait()
        if self.redis is not None:
            self.redis.stop()
        if self.config.own_certs:  # this run's keys go with it
            shutil.rmtree(self.config.tls_dir, ignore_errors=True)


def _served_model(config: ClusterConfig) -> str:
    """The model name clients must pass, as the gateway lists it."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    request = urllib.request.Request(config.http_url + "/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())["data"][0]["id"]
    except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError):
        return "MODEL"


LOG_TAIL_BYTES = 64 * 1024
MAX_REASON_CHARS = 600


def startup_failure(service: Supervised) -> str:
    """How a service ended during start-up, with the reason it printed, so that the operator need not
    open its log: 'exited with code 1 during start-up: <its error> (log: <path>)'."""
    how = f"{exit_reason(service.process.returncode)} during start-up"
    try:
        with open(service.log, "rb") as log:  # what this run wrote: a reused --log-dir holds older runs'
            log.seek(max(service.log_start, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            tail = log.read().decode(errors="replace").splitlines()
    except OSError:
        tail = []
    errors = [line[len(ERROR_PREFIX):].strip() for line in tail if line.startswith(ERROR_PREFIX)]
    if errors:
        why = errors[-1] if len(errors[-1]) <= MAX_REASON_CHARS else errors[-1][:MAX_REASON_CHARS] + " ..."
        return f"{how}: {why} (log: {service.log})"
    return f"{how}; see {service.log}"


def is_ready(http_url: str) -> bool:
    """Whether the gateway at http_url answers its readiness check with 200."""
    url = http_url + "/ready"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, HTTPException):  # not our gateway (yet): not ready
        return False


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    warn_if_open(config.cluster_auth)
    cluster = Cluster(config)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the cluster like Ctrl-C, at any point
    try:
        cluster.start()
        placement = ", ".join(f"{name} on cores {format_cpus(list(cpus))}"
                              for name, cpus in zip(config.worker_names, config.worker_cpus))
        print(f"starting {config.describe()}; {placement if config.pin else 'workers not pinned'}; "
              f"logs in {config.log_dir}", flush=True)
        cluster.wait_ready()
        _print_endpoints(config)
        _serve(cluster)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan the services
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping the cluster ...", flush=True)
        cluster.stop()
        print("stopped", flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _serve(cluster: Cluster) -> NoReturn:
    """Watch the services until Ctrl-C / SIGTERM (a KeyboardInterrupt) ends the launcher.

    A service that exits on its own is restarted after its backoff, so one crash costs only the
    requests it held (the scheduler requeues a lost worker's). With --adapt, the placement follows
    the scheduler's recommendations.
    """
    adapter = adapt.Adapter(cluster) if cluster.config.adapt else None
    while True:  # the services are other processes: watching them is polling by nature
        cluster.supervise()
        for name, code in cluster.reap_retired():
            print(f"{name} drained and exited ({code})", flush=True)
        if adapter is not None:
            adapter.tick()
        time.sleep(0.5)


def _more_gateways(config: ClusterConfig) -> str:
    return "".join(f"\n  gateway-{i}:  http://{config.host}:{http}/v1, gRPC {config.host}:{grpc}"
                   for i, (http, grpc) in enumerate(config.more_gateways, 1))


def _print_endpoints(config: ClusterConfig) -> None:
    model = _served_model(config)
    key = ' -H "Authorization: Bearer $SPLITSERVE_API_KEY"' if config.api_key else ""
    print(f"""
splitserve is ready.
  OpenAI API: {config.http_url}/v1   (models: {config.http_url}/v1/models)
  gRPC:       {config.host}:{config.grpc_port}   (splitserve generate --gateway {config.host}:{config.grpc_port} "...")
  metrics:    {config.http_url}/metrics{_more_gateways(config)}
  logs:       {config.log_dir}

Try:
  curl {config.http_url}/v1/chat/completions{key} -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Why is the sky blue?"}}], "max_tokens": 64}}'

Ctrl-C stops the cluster.""", flush=True)
