"""Redis with a password, and over TLS (issue 14): services AUTH with credentials from the
environment or a file, never from a URL on their command line; rediss:// URLs reach a TLS server and
check its certificate. The bundled redis-server is built without TLS, so the TLS test puts a TLS
terminator (as stunnel or a cloud Redis's front end) before it: the client side, ours, is real.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl

import pytest
import redis

from splitserve.common.auth import REDIS_PASSWORD_ENV, RedisCredentials, redis_credentials_from_args
from splitserve.common.certs import write_cluster_certs
from splitserve.queue.redis_server import LocalRedis
from splitserve.queue.streams import connect, redacted


@pytest.fixture(scope="module")
def locked_redis():
    with LocalRedis(password="a-redis-password-for-tests") as server:
        yield server


def test_a_redis_with_a_password_refuses_clients_without_it(locked_redis):
    with redis.Redis(port=locked_redis.port) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with redis.Redis(port=locked_redis.port, password="wrong-password") as wrong, \
            pytest.raises(redis.AuthenticationError):
        wrong.ping()

    async def ping() -> bool:
        client = connect(locked_redis.url, RedisCredentials(password="a-redis-password-for-tests"))
        try:
            return await client.ping()
        finally:
            await client.aclose()
    assert asyncio.run(ping())


def test_a_password_with_quotes_and_backslashes_is_the_password():
    """It reaches redis-server in a config line: quoted, it is taken whole, not cut or changed."""
    tricky = 'p"a\\ss\'wo#rd'
    with LocalRedis(password=tricky) as server, redis.Redis(port=server.port, password=tricky) as client:
        assert client.ping()
        with redis.Redis(port=server.port, password="p") as cut, pytest.raises(redis.AuthenticationError):
            cut.ping()


async def _terminate_tls(context: ssl.SSLContext, backend_port: int) -> asyncio.Server:
    """A TLS listener on a free port that forwards each connection, decrypted, to backend_port."""
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(reader, writer) -> None:
        backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", backend_port)
        await asyncio.gather(pipe(reader, backend_writer), pipe(backend_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)


def test_rediss_urls_reach_redis_over_tls_and_check_its_certificate(locked_redis, tmp_path):
    write_cluster_certs(tmp_path / "ours", roles=("gateway",), gateway_names=("127.0.0.1",))
    write_cluster_certs(tmp_path / "other", roles=())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "ours" / "gateway" / "tls.crt", tmp_path / "ours" / "gateway" / "tls.key")
    credentials = RedisCredentials(password="a-redis-password-for-tests")

    async def scenario() -> None:
        front = await _terminate_tls(context, locked_redis.port)
        port = front.sockets[0].getsockname()[1]
        try:
            client = connect(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'ours' / 'ca.crt'}", credentials)
            assert await client.ping()
            await client.set("over-tls", b"yes")
            assert await client.get("over-tls") == b"yes"
            await client.aclose()
            stranger = connect(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'other' / 'ca.crt'}",
                               credentials)
            with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
                await stranger.ping()
            await stranger.aclose()
        finally:
            front.close()
            await front.wait_closed()
    asyncio.run(scenario())


def test_credentials_come_from_a_file_or_the_environment_and_urls_are_logged_redacted(tmp_path, monkeypatch):
    monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    none = argparse.Namespace(redis_password_file=None, redis_username=None)
    assert redis_credentials_from_args(none) == RedisCredentials()
    monkeypatch.setenv(REDIS_PASSWORD_ENV, "from-env")
    assert redis_credentials_from_args(none).password == "from-env"
    assert "from-env" not in repr(redis_credentials_from_args(none))
    path = tmp_path / "password"
    path.write_text("from-file\n")
    given = redis_credentials_from_args(argparse.Namespace(redis_password_file=str(path), redis_username="app"))
    assert given == RedisCredentials("app", "from-file")
    path.write_text("has space\n")
    with pytest.raises(ValueError, match="Redis password"):
        redis_credentials_from_args(argparse.Namespace(redis_password_file=str(path), redis_username=None))
    assert redacted("redis://:secret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redacted("rediss://app:p@ss@redis:6380/0?ssl_ca_certs=/ca") == "rediss://app:***@redis:6380/0?ssl_ca_certs=/ca"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redacted("redis://redis:6379/0?password=secret&db=1") == "redis://redis:6379/0?password=***&db=1"
