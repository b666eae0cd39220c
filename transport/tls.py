"""TLS 1.3 between pagers and memory nodes, mutually authenticated by the cluster's own CA.

A TLS directory (``--tls-dir``, default ``$XDG_DATA_HOME/ssi-pager/tls``, mode 0700) holds:

* ``ca.pem``: the cluster CA's certificate, which every peer's certificate must chain to;
* ``ca.key``: the CA's private key (0600), needed only to issue certificates;
* ``cert.pem``/``key.pem``: this host's certificate and key (0600).

The first `ensure_tls_dir` on a host makes what is missing, like the cluster token: a new CA
when there is neither ``ca.pem`` nor ``ca.key``, and this host's certificate when there is a
CA key to sign it. So: start the first memory node with ``--tls``, copy ``ca.pem`` and
``ca.key`` (0600) to every other host of the cluster, and each makes its own certificate on
its first start; or give every host the operator's own ``ca.pem``, ``cert.pem`` and
``key.pem`` (no CA key needed then). Peers are authenticated by the CA, not by host name
(nodes are addressed by IP): anyone holding a certificate of the cluster's CA is a peer, as
anyone holding the token is. The token handshake still runs inside TLS.

Both sides require TLS 1.3 and a peer certificate. The TLS of a lane runs in C
(`transport.tlsc`, OpenSSL), so the C lanes carry it: a pager's `BlockingChannel` does its
handshake and plaintext I/O through a C session whose handle its C fault loop gets with the
fd (SSL_read/SSL_write in `transport/wire/ssip_io.h`); a memory node runs every connection's
TLS in C on memory buffers fed by its asyncio protocol, and moves the session onto the socket
while its C fault lane serves the connection. TLS then costs encryption, not the C fast path
(`ssi-pager bench transport --tls` measures it beside plaintext). The pager's asyncio lanes
(bulk transfers) use Python's `ssl` with the same files. RDMA is not used with TLS.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from transport.errors import TlsError
from transport.token import data_dir, private_dir

log = logging.getLogger(__name__)

CA_CERT, CA_KEY, CERT, KEY = "ca.pem", "ca.key", "cert.pem", "key.pem"
VALID_DAYS = 3650


def default_tls_dir() -> Path:
    return data_dir() / "tls"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _issue(name: str, ca: tuple[Any, Any] | None) -> tuple[bytes, bytes, Any, Any]:
    """A new EC P-256 key and its certificate, signed by ``ca`` (cert, key), or self-signed
    as a CA when ``ca`` is None. Returns (cert PEM, key PEM, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = ca if ca is not None else (None, key)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))
    if ca is None:
        b = (b.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                          False), critical=True))
    else:
        b = (b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False))
    cert = b.sign(issuer_key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, cert, key


def ensure_tls_dir(path: str | os.PathLike[str] | None = None, *, name: str = "ssi-pager",
                   who: str = "memnode") -> Path:
    """The TLS directory, with a CA and this host's certificate made where missing."""
    d = Path(path) if path else default_tls_dir()
    try:
        private_dir(d)
    except OSError as exc:
        raise TlsError(f"cannot create TLS directory {d}: {exc.strerror}; pass --tls-dir "
                       "somewhere writable", errno=exc.errno) from exc
    have = {f: (d / f).exists() for f in (CA_CERT, CA_KEY, CERT, KEY)}
    if have[CERT] and have[KEY] and have[CA_CERT]:
        return d
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError as exc:
        raise TlsError(f"{d} lacks {CERT}/{KEY} and certificates cannot be made here "
                       f"(python3-cryptography missing: {exc}); install it, or put your own "
                       f"{CA_CERT}, {CERT} and {KEY} there") from None
    try:
        if not have[CA_CERT] and not have[CA_KEY]:
            ca_pem, ca_key_pem, ca_cert, ca_key = _issue("ssi-pager cluster CA", None)
            _write_private(d / CA_KEY, ca_key_pem)
            _write_private(d / CA_CERT, ca_pem)
            print(f"{who}: created the cluster CA in {d} (copy {CA_CERT} and {CA_KEY}, mode "
                  "0600, to every host of the cluster)", file=sys.stderr)
        elif have[CA_KEY] and have[CA_CERT]:
            ca_cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
            ca_key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), None)
        else:
            raise TlsError(f"{d} has {CA_CERT if have[CA_CERT] else CA_KEY} without "
                           f"{CA_KEY if have[CA_CERT] else CA_CERT} and no {CERT}/{KEY}: "
                           f"copy the cluster's {CA_CERT} and {CA_KEY} there (or your own "
                           f"{CERT} and {KEY})")
        cert_pem, key_pem, _c, _k = _issue(name, (ca_cert, ca_key))
        _write_private(d / KEY, key_pem)
        _write_private(d / CERT, cert_pem)
    except FileExistsError:
        pass  # another process of this host made them first
    except (OSError, ValueError) as exc:
        raise TlsError(f"cannot make TLS material in {d}: {exc}; check the directory, or "
                       "put your own files there", errno=getattr(exc, "errno", None)) from exc
    log.info("TLS: certificate %s issued by %s", d / CERT, d / CA_CERT)
    return d


def _context(purpose: int, d: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(d / CERT, d / KEY)
        ctx.load_verify_locations(d / CA_CERT)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load TLS material from {d} ({CA_CERT}, {CERT}, {KEY}): "
                       f"{exc}; run the memory node once with --tls to make them, or copy "
                       "them there", errno=getattr(exc, "errno", None)) from exc
    ctx.check_hostname = False  # peers are the CA's, addressed by IP: see the module doc
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.ssi_tls_dir = d  # type: ignore[attr-defined]  # the C layer's context: `c_context`
    return ctx


def server_context(path: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A memory node's context: TLS 1.3, a client certificate of the cluster CA required."""
    return _context(ssl.PROTOCOL_TLS_SERVER, Path(path) if path else default_tls_dir())


def client_context(path: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A pager's context: TLS 1.3, the node's certificate must be the cluster CA's."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, Path(path) if path else default_tls_dir())


# --- the pager's side: one context for every lane of the process ------------------------------

_client: ssl.SSLContext | None = None


def use_client_tls(ctx: ssl.SSLContext | None) -> None:
    """Every connection this process makes to a memory node from now on uses ``ctx`` (None:
    plaintext). `serve --tls` sets it once, before any lane exists. The C layer's context
    is made now, so missing TLS support fails here (`TlsError`), not at the first fault."""
    global _client
    if ctx is not None:
        c_context(ctx, server=False)
    _client = ctx


def client_tls() -> ssl.SSLContext | None:
    return _client


def c_context(ctx: ssl.SSLContext, *, server: bool) -> Any:
    """The C layer's context (`transport.tlsc.TlsContext`) for the files ``ctx`` was made
    from: the lanes' TLS runs in C, the Python context serves the asyncio client lanes."""
    from transport import tlsc

    d = getattr(ctx, "ssi_tls_dir", None)
    if d is None:
        raise TlsError("this TLS context was not made by transport.tls.server_context/"
                       "client_context: the lanes need its directory")
    return tlsc.context(server, d)


def wrap_client(sock: socket.socket, ctx: ssl.SSLContext, label: str) -> Any:
    """TLS over a connected blocking socket, run by the C layer (handshake included, bounded
    by the socket's SO_RCVTIMEO/SO_SNDTIMEO): a `transport.tlsc.TlsSocket`."""
    from transport import tlsc

    try:
        cctx = c_context(ctx, server=False)
    except TlsError:
        sock.close()
        raise
    return tlsc.connect(sock, cctx, label)
