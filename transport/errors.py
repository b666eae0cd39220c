"""Errors of the transport package; every one says what to do about it.

One hierarchy: everything raised on purpose by ``transport`` derives from `TransportError`.
``errno`` is kept when an OS error is the cause (``TransportError.errno``), and a memory node's
error frame keeps its protocol code (`RemoteError.code`).
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every transport error."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class ProtocolError(TransportError):
    """A frame broke the wire protocol (bad magic, oversized, unknown type, bad fields).

    ``code`` is the `protocol.ErrorCode` to answer with; ``fatal`` says the byte stream can no
    longer be trusted and the connection must be closed after the error frame.
    """

    def __init__(self, message: str, code: int, *, fatal: bool = False,
                 request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal
        self.request_id = request_id


class TokenError(TransportError):
    """The cluster token file is missing, unreadable or too widely readable."""


class RemoteError(TransportError):
    """The memory node answered a request with an error frame (permanent: retrying the same
    request cannot change the answer)."""

    def __init__(self, message: str, code: int, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


class AuthError(RemoteError):
    """The cluster-token handshake failed: wrong token, a node that demands a token we lack,
    or a node that does not authenticate while we hold a token. Permanent, like every
    `RemoteError`: no retry loop (the transport's or the engine's) retries it. ``code`` is the
    node's error code when the node refused us, 0 when we refused the node."""

    def __init__(self, message: str, code: int = 0, request_id: int = 0) -> None:
        super().__init__(message, code, request_id)


class ConnectError(TransportError):
    """No connection to the peer could be made (refused, unreachable, timed out)."""


class ConnectionLost(TransportError):
    """An established connection closed while requests were outstanding."""


class NoFreePortError(TransportError):
    """Every port of the auto-selection range is taken."""


class StoreError(TransportError):
    """The memory node's page store failed (bad space name, I/O error on the sparse file)."""


class StoreCorruptError(StoreError):
    """A written page read back wrong: its checksum fails, or its page file was truncated.
    The node answers CORRUPT, never the bytes."""


class CorruptPageError(RemoteError):
    """The memory node answered CORRUPT: the page it holds is damaged (checksum or truncated
    file). Treat the node's copy as lost: read a replica or restore it."""


class StaleEpochError(RemoteError):
    """The memory node answered STALE_EPOCH: a newer owner holds the space (its guest was
    resumed by another pager), so this pager may neither store into it nor read it: its
    guest's memory is the newer owner's now."""


class StoreIdentityError(RemoteError):
    """The memory node's store is not the one this pager wrote the space to (the node was
    restarted on an empty or another store directory): its answers would be wrong pages.
    ``missed``: the store is the same, but the node missed stores to the space while down
    (its writer recorded so), so only that space's copy is out of date."""

    missed = False


class TlsError(TransportError):
    """TLS material is missing, unreadable or does not fit together, or a TLS handshake was
    refused (a peer without a certificate of the cluster CA): permanent, not retried."""


class RdmaUnavailable(TransportError):
    """RDMA cannot be used here (no extension or libraries, no device); callers fall back to
    TCP."""
