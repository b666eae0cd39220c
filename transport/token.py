"""The cluster token: one shared secret per cluster, kept in a 0600 file in a 0700 directory.

Default locations follow XDG: ``$XDG_DATA_HOME/ssi-pager/token`` and ``.../store/``
(``~/.local/share/ssi-pager`` when XDG_DATA_HOME is unset). A memory node creates the token
on first start; copy that file (keeping mode 0600) to every pager host of the cluster.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import sys
from pathlib import Path

from transport.errors import TokenError

log = logging.getLogger(__name__)


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return Path(base) / "ssi-pager"


def default_token_path() -> Path:
    return data_dir() / "token"


def default_store_dir() -> Path:
    return data_dir() / "store"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def load_token(path: str | os.PathLike[str] | None = None) -> bytes:
    """Read the token; refuse one that group or others can read."""
    p = Path(path) if path else default_token_path()
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        why = ("it is a symbolic link, and links are refused: give the file itself"
               if exc.errno == errno.ELOOP else exc.strerror)
        raise TokenError(f"cannot read cluster token {p}: {why}; copy the memory node's "
                         f"token file there (mode 0600) or pass --token-file",
                         errno=exc.errno) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenError(f"cluster token {p} is not a regular file: pass --token-file "
                             f"the token file itself (mode 0600), not a directory",
                             errno=errno.EISDIR if stat.S_ISDIR(st.st_mode) else None)
        if st.st_mode & 0o077:
            raise TokenError(f"cluster token {p} is readable by others (mode "
                             f"{stat.S_IMODE(st.st_mode):o}): run chmod 600 {p}")
        try:
            token = os.read(fd, 4096).strip()
        except OSError as exc:
            raise TokenError(f"cannot read cluster token {p}: {exc.strerror}",
                             errno=exc.errno) from exc
    finally:
        os.close(fd)
    if len(token) < 16:
        raise TokenError(f"cluster token {p} is empty or too short (< 16 bytes): delete it "
                         f"and restart the memory node to create a new one")
    return token


def ensure_token(path: str | os.PathLike[str] | None = None) -> bytes:
    """Load the token, creating it (0600 file, 0700 directory) if it does not exist yet."""
    p = Path(path) if path else default_token_path()
    if not p.exists():
        private_dir(p.parent)
        token = secrets.token_hex(32).encode()
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return load_token(p)  # another process created it first
        with os.fdopen(fd, "wb") as f:
            f.write(token + b"\n")
        log.info("created cluster token %s", p)
        print(f"memnode: created cluster token {p} (copy it, mode 0600, to pager hosts)",
              file=sys.stderr)
        return token
    return load_token(p)
