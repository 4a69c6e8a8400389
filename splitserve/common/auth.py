"""Cluster identity, in two modes that can be used together.

Shared token (the minimal mode): every internal gRPC call carries the cluster's token, and every
internal server checks it (in constant time) before it runs or even parses anything; a caller
without it gets UNAUTHENTICATED. Only the standard health service stays open: it says SERVING or
not, and container runtimes probe it without credentials. The token reaches a process from the
environment (SPLITSERVE_CLUSTER_TOKEN) or a file (--cluster-token-file), never from its command
line, which any local user can read in /proc.

Mutual TLS (the production mode, --cluster-tls-dir; certs.py): every internal connection is
encrypted, a caller without a certificate from the cluster's CA cannot complete the handshake, and
each method is admitted only from the roles that call it (CALLER_ROLES: a worker takes Submit and
Abort from the scheduler alone, a prefill server serves KV to decode servers alone); another
member's certificate gets PERMISSION_DENIED before the handler runs.
"""

from __future__ import annotations

import argparse
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from splitserve.common.certs import ROLE_PREFIX, ROLES, ClusterTLS, load_cluster_tls, role_of

TOKEN_ENV = "SPLITSERVE_CLUSTER_TOKEN"
TOKEN_FILE_ENV = "SPLITSERVE_CLUSTER_TOKEN_FILE"
METADATA_KEY = "x-splitserve-cluster-token"
# The leader's fencing epoch, on every Submit and Abort a scheduler sends a worker (worker/common.py's
# Fence refuses an older one).
EPOCH_METADATA_KEY = "x-splitserve-epoch"
# 24 bytes of randomness in URL-safe base64 is 32 characters; a shorter token is too guessable.
MIN_TOKEN_CHARS = 32
MAX_TOKEN_CHARS = 1024
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
TLS_DIR_ENV = "SPLITSERVE_CLUSTER_TLS_DIR"
WORKERS = frozenset({"prefill", "decode", "colocated"})
ANY_MEMBER = frozenset(ROLES)
# Under mutual TLS, the roles (certs.ROLES) each method is taken from. A method named nowhere here is
# refused to every caller (PERMISSION_DENIED): a new RPC must be given its callers.
CALLER_ROLES: dict[str, frozenset[str]] = {
    **{f"/splitserve.v1.{service}/{method}": frozenset({"scheduler"})
       for service in ("Prefill", "Decode") for method in ("Submit", "Abort")},
    "/splitserve.v1.Prefill/PullKv": frozenset({"decode"}),
    "/splitserve.v1.Prefill/Release": frozenset({"decode"}),
    "/splitserve.v1.Scheduler/Register": WORKERS,
    "/splitserve.v1.Scheduler/Heartbeat": WORKERS,
    "/splitserve.v1.Scheduler/HandBack": WORKERS,
    "/splitserve.v1.Scheduler/PrefillDone": frozenset({"prefill", "colocated"}),
    "/splitserve.v1.Scheduler/RequestDone": frozenset({"decode", "colocated"}),
    "/splitserve.v1.Scheduler/Drain": WORKERS | {"admin"},  # a worker drains itself; an operator any
    "/splitserve.v1.Scheduler/GetRecommendation": frozenset({"admin"}),
    "/splitserve.v1.Scheduler/ResetPrefixCache": frozenset({"gateway", "admin"}),
    "/splitserve.v1.Prefill/ResetPrefixCache": frozenset({"scheduler"}),
    # Read-only: any member.
    "/splitserve.v1.Prefill/GetStats": ANY_MEMBER,
    "/splitserve.v1.Decode/GetStats": ANY_MEMBER,
    "/splitserve.v1.Scheduler/GetClusterState": ANY_MEMBER,
    **{method: ANY_MEMBER for method in OPEN_METHODS},
}


@dataclass(frozen=True)
class ClusterAuth:
    """How this process proves it belongs to the cluster, and what its servers ask of callers.

    token None is an unauthenticated plane: the process's servers trust any caller (a warning at
    start says so). The gateway's client edge never uses this (its API key guards it).
    """

    token: str | None = field(repr=False)  # a config logged whole must not log the secret
    tls: ClusterTLS | None = None  # mutual TLS: this process's certificate, key and the cluster CA

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.tls is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return ([_RequireToken(self.token)] if self.token is not None else []) + \
               ([_RequireRole(CALLER_ROLES)] if self.tls is not None else [])

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Mutual TLS for an internal server (callers must show a certificate from the CA); None: plaintext."""
        if self.tls is None:
            return None
        return grpc.ssl_server_credentials([(self.tls.key, self.tls.cert)], root_certificates=self.tls.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """This process's certificate for an internal channel, servers checked against the CA; None: plaintext."""
        if self.tls is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.tls.ca, private_key=self.tls.key,
                                            certificate_chain=self.tls.cert)

    def channel_options(self, server_role: str) -> list[tuple[str, str]]:
        """A server is checked against the name of the role the client means to reach
        (splitserve-ROLE, in that role's certificate), not the address it dials (IPs and pod names
        are in no certificate): a prefill server's key cannot pass for the scheduler."""
        return [("grpc.ssl_target_name_override", f"{ROLE_PREFIX}{server_role}")] if self.tls is not None else []

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """Each call on a channel carries the token, whatever its kind."""
        return [kind(self.token) for kind in _ATTACH_KINDS] if self.token is not None else []

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """For blocking (non-aio) calls: pass as metadata= on each call."""
        return ((METADATA_KEY, self.token),) if self.token is not None else ()


NO_AUTH = ClusterAuth(None)


def new_token() -> str:
    """A fresh cluster token: 32 random bytes, URL-safe (valid in gRPC metadata)."""
    return secrets.token_urlsafe(32)


def _visible_ascii(text: str, min_chars: int) -> bool:
    """min_chars to MAX_TOKEN_CHARS characters, each printable ASCII and not a space: what a gRPC
    metadata value or an HTTP bearer token can carry as it is."""
    return min_chars <= len(text) <= MAX_TOKEN_CHARS and all(33 <= ord(c) <= 126 for c in text)


def _read_secret(path: str, what: str) -> str:
    """The stripped text of a secret's file; ValueError naming what when it cannot be read."""
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc}") from None


def check_token(token: str, source: str) -> str:
    """The token, stripped, if it is MIN..MAX_TOKEN_CHARS visible ASCII characters; else ValueError."""
    token = token.strip()
    if not _visible_ascii(token, MIN_TOKEN_CHARS):
        raise ValueError(f"the cluster token from {source} must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} "
                         f"visible ASCII characters (splitserve up makes one per run)")
    return token


def add_cluster_auth_args(parser: argparse.ArgumentParser, tls_dir: bool = True) -> None:
    """--cluster-token-file, and unless tls_dir is False (splitserve up makes its own) --cluster-tls-dir."""
    parser.add_argument("--cluster-token-file", default=os.environ.get(TOKEN_FILE_ENV),
                        help=f"file holding the cluster token every internal call must carry (env "
                             f"{TOKEN_FILE_ENV}; or the token itself in env {TOKEN_ENV}, never on the "
                             f"command line). Without a token or --cluster-tls-dir a service trusts any "
                             f"caller, while `splitserve up` makes a fresh token per run")
    if not tls_dir:
        return
    parser.add_argument("--cluster-tls-dir", default=os.environ.get(TLS_DIR_ENV),
                        help=f"folder with ca.crt, tls.crt and tls.key (splitserve certs writes one per "
                             f"role): internal calls then use mutual TLS, and each method is taken only "
                             f"from the roles that call it (env {TLS_DIR_ENV})")


def cluster_auth_from_args(args: argparse.Namespace) -> ClusterAuth:
    """The token from --cluster-token-file, else the environment, and the TLS material of
    --cluster-tls-dir; raises ValueError for a bad token, file or certificate."""
    tls = load_cluster_tls(args.cluster_tls_dir) if getattr(args, "cluster_tls_dir", None) else None
    token = None
    if args.cluster_token_file:
        token = check_token(_read_secret(args.cluster_token_file, "cluster token"), args.cluster_token_file)
    elif (from_env := os.environ.get(TOKEN_ENV)) is not None:
        token = check_token(from_env, TOKEN_ENV)
    return ClusterAuth(token, tls)


def peer_role(context: grpc.aio.ServicerContext) -> str | None:
    """The role the caller's certificate names (mutual TLS), None without one."""
    names = context.auth_context().get("x509_common_name") or []
    return role_of(names[0].decode(errors="replace")) if len(names) == 1 else None


REDIS_PASSWORD_ENV = "SPLITSERVE_REDIS_PASSWORD"
REDIS_PASSWORD_FILE_ENV = "SPLITSERVE_REDIS_PASSWORD_FILE"
REDIS_USERNAME_ENV = "SPLITSERVE_REDIS_USERNAME"


@dataclass(frozen=True)
class RedisCredentials:
    """Who a service is to Redis (AUTH): an ACL user (None: the default user) and its password
    (None: no AUTH). Kept out of the Redis URL, which services log and put on command lines."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)


def add_redis_auth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-password-file", default=os.environ.get(REDIS_PASSWORD_FILE_ENV),
                        help=f"file holding the Redis password (env {REDIS_PASSWORD_FILE_ENV}; or the password "
                             f"itself in env {REDIS_PASSWORD_ENV}, never on the command line; default: no AUTH)")
    parser.add_argument("--redis-username", default=os.environ.get(REDIS_USERNAME_ENV),
                        help=f"Redis ACL user to authenticate as (env {REDIS_USERNAME_ENV}; default: the "
                             f"default user)")


def redis_credentials_from_args(args: argparse.Namespace) -> RedisCredentials:
    """From --redis-password-file, else env SPLITSERVE_REDIS_PASSWORD; ValueError for an unreadable
    file or a password that is not 1 to 1,024 visible ASCII characters."""
    source = args.redis_password_file or REDIS_PASSWORD_ENV
    password = (_read_secret(args.redis_password_file, "Redis password") if args.redis_password_file
                else os.environ.get(REDIS_PASSWORD_ENV))
    if password is not None and not _visible_ascii(password.strip(), 1):
        raise ValueError(f"the Redis password from {source} must be 1 to {MAX_TOKEN_CHARS} visible ASCII characters")
    return RedisCredentials(args.redis_username or None, password.strip() if password is not None else None)


API_KEY_ENV = "SPLITSERVE_API_KEY"
API_KEY_FILE_ENV = "SPLITSERVE_API_KEY_FILE"


def add_api_key_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' from clients on /v1/* and gRPC (env "
                             f"{API_KEY_ENV}, better than the flag: a command line is visible to every "
                             f"local user; default: no key)")
    parser.add_argument("--api-key-file", default=os.environ.get(API_KEY_FILE_ENV),
                        help=f"read the API key from this file instead (env {API_KEY_FILE_ENV})")


def api_key_from_args(args: argparse.Namespace) -> str | None:
    """The clients' API key from --api-key-file, else --api-key / the environment; None: no key."""
    if not args.api_key_file:
        return args.api_key or None
    key = _read_secret(args.api_key_file, "API key")
    if not _visible_ascii(key, 1):
        raise ValueError(f"the API key in {args.api_key_file} must be 1 to {MAX_TOKEN_CHARS} visible ASCII "
                         f"characters")
    return key


class _RequireToken(grpc.aio.ServerInterceptor):
    """Refuses, before the handler runs and before its request is parsed, every call without the token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS or self._carries_token(details):
            return handler
        return _refusal(handler)

    def _carries_token(self, details: grpc.HandlerCallDetails) -> bool:
        given = [v for k, v in details.invocation_metadata or () if k == METADATA_KEY]
        return (len(given) == 1 and isinstance(given[0], str)
                and hmac.compare_digest(given[0].encode(), self._token))


class _RequireRole(grpc.aio.ServerInterceptor):
    """Runs a method only for a caller whose certificate names one of the roles policy gives it
    (none for a method policy does not name); PERMISSION_DENIED for any other member (the TLS
    handshake already refused non-members)."""

    def __init__(self, policy: dict[str, frozenset[str]]) -> None:
        self._policy = policy

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        roles = self._policy.get(details.method, frozenset())

        async def check(context) -> None:
            if (role := peer_role(context)) not in roles:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{details.method} is taken from {', '.join(sorted(roles))} only; the "
                                    f"caller's certificate names {role or 'no splitserve role'}")

        kinds = dict(request_deserializer=handler.request_deserializer,
                     response_serializer=handler.response_serializer)
        if handler.unary_unary:
            async def unary(request, context):
                await check(context)
                return await handler.unary_unary(request, context)
            return grpc.unary_unary_rpc_method_handler(unary, **kinds)
        if handler.unary_stream:
            async def stream(request, context):
                await check(context)
                async for response in handler.unary_stream(request, context):
                    yield response
            return grpc.unary_stream_rpc_method_handler(stream, **kinds)
        raise TypeError(f"{details.method}: only unary requests carry a role check")


async def _refuse(request, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this is an internal service of a splitserve "
                        "cluster: calls must carry the cluster's token")


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as handler that only refuses; requests stay unparsed bytes."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_refuse)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_refuse)
    return grpc.stream_stream_rpc_method_handler(_refuse)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(METADATA_KEY, token)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


class _AttachToken:
    """Adds the cluster token to each call's metadata; one subclass per kind of call, because a
    channel files each interceptor under the first kind it is an instance of (one class of all four
    would add the token to unary calls only)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def _call(self, continuation, details, request_or_iterator):
        return await continuation(_with_token(details, self._token), request_or_iterator)


class _AttachToUnaryUnary(_AttachToken, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AttachToken._call


class _AttachToUnaryStream(_AttachToken, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AttachToken._call


class _AttachToStreamUnary(_AttachToken, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AttachToken._call


class _AttachToStreamStream(_AttachToken, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AttachToken._call


_ATTACH_KINDS = (_AttachToUnaryUnary, _AttachToUnaryStream, _AttachToStreamUnary, _AttachToStreamStream)


def warn_if_open(auth: ClusterAuth) -> None:
    """Say loudly, at start, that this service trusts any caller."""
    if not auth.enabled:
        structlog.get_logger(__name__).warning(
            "the cluster plane is unauthenticated: any process that reaches this service's internal "
            f"ports is trusted; give every service one token (env {TOKEN_ENV} or --cluster-token-file) "
            f"or certificates (--cluster-tls-dir)")
