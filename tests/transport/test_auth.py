"""Authentication is all or nothing and permanent (issue 14 items 1 and 7): a pager holding a
token refuses a node that does not authenticate, and a refused token is never retried."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest

from transport.errors import AuthError, RemoteError
from transport.tcp import BlockingChannel, TcpTransport, run
from transport.wire import (
    Backoff,
    ClientSession,
    FrameReader,
    ServerSession,
    retryable,
)
from transport.wire.client import reply_from_frame

TOKEN = b"0123456789abcdef0123456789abcdef"
PAGE = 4096


def _handshake(server: ServerSession, client: ClientSession) -> None:
    """Drive a handshake through bytes until the client is done or raises."""
    out = client.start()
    replies = FrameReader()
    while not client.done:
        server.receive_data(out)
        while (ev := server.next_event()) is not None:
            name = type(ev).__name__
            if name == "Hello":
                replies.receive_data(server.welcome(ev.request_id))
            elif name == "Auth":
                replies.receive_data(server.auth_ok(ev.request_id))
            elif name == "Open":
                replies.receive_data(server.opened(ev.request_id, ev.space))
        frame = replies.next_frame()
        assert frame is not None, "the server answered nothing"
        out = client.receive(reply_from_frame(frame))


def test_token_holder_refuses_a_node_without_auth_sans_io():
    client = ClientSession(TOKEN, "vm1", nonce=b"n" * 32, endpoint="10.0.0.9:50051")
    with pytest.raises(AuthError, match=r"10\.0\.0\.9:50051.*--insecure-no-auth.*--token-file"):
        _handshake(ServerSession(token=None, challenge=b"c" * 32), client)
    assert not client.done and client.space == 0


def test_tokenless_client_still_opens_an_insecure_node_sans_io():
    client = ClientSession(None, "vm1", nonce=b"n" * 32)
    _handshake(ServerSession(token=None, challenge=b"c" * 32), client)
    assert client.done and client.space == 1


def test_auth_errors_are_permanent_for_every_retry_loop():
    exc = AuthError("x")
    assert isinstance(exc, RemoteError)  # loops that stop on a node's refusal stop on this
    assert not retryable(exc)
    assert Backoff(0.0, 100.0).delay(0.0, exc) is None


@pytest.fixture
def insecure_node(node_factory, tmp_path):
    return node_factory("--insecure-no-auth", store=tmp_path / "s2",
                        token_file=tmp_path / "unused")


def test_blocking_channel_with_token_refuses_insecure_node(insecure_node, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(AuthError) as info:
        BlockingChannel.connect(insecure_node.endpoint, TOKEN, "vm1", retry_for=60.0)
    msg = str(info.value)
    assert insecure_node.endpoint in msg and "--insecure-no-auth" in msg, msg
    assert not [r for r in caplog.records if "reconnect" in r.getMessage()]
    # the node itself serves a tokenless client: the refusal is the pager's choice
    with BlockingChannel.connect(insecure_node.endpoint, None, "vm1") as ch:
        ch.store(0, b"q" * PAGE)


def test_tcp_transport_with_token_refuses_insecure_node(insecure_node):
    async def main() -> None:
        t = TcpTransport(TOKEN, "vm1", retry_for=60.0)
        try:
            await asyncio.wait_for(t.connect_peer("n0", insecure_node.endpoint), 30)
        finally:
            await t.close()

    with pytest.raises(AuthError, match="--insecure-no-auth"):
        run(main())


def test_wrong_token_is_refused_once_not_retried(memnode, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(AuthError, match=r"permanent") as info:
        BlockingChannel.connect(memnode.endpoint, b"not-the-token-0123456789", "vm1",
                                retry_for=60.0)
    assert memnode.endpoint in str(info.value)
    assert not [r for r in caplog.records if "reconnect" in r.getMessage()]


def _serve(tmp_path, endpoint: str, token_file) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pager.cli", "serve", "--socket", str(tmp_path / "p.sock"),
         "--memnode", endpoint, "--token-file", str(token_file)],
        capture_output=True, text=True, timeout=120)


def _token_file(tmp_path, token: bytes):
    path = tmp_path / "pager-token"
    path.write_bytes(token)
    path.chmod(0o600)
    return path


def test_serve_with_wrong_token_fails_at_start(memnode, tmp_path):
    done = _serve(tmp_path, memnode.endpoint, _token_file(tmp_path, b"w" * 32))
    assert done.returncode == 1, done.stderr
    assert "authentication" in done.stderr and memnode.endpoint in done.stderr, done.stderr
    assert "not reachable" not in done.stderr and "pager: serving" not in done.stderr


def test_serve_with_token_refuses_insecure_node_at_start(insecure_node, tmp_path):
    done = _serve(tmp_path, insecure_node.endpoint, _token_file(tmp_path, TOKEN))
    assert done.returncode == 1, done.stderr
    assert "--insecure-no-auth" in done.stderr and "pager: serving" not in done.stderr
