"""Who may hand a uffd to the pager, and which memory-node spaces each client may use.

The model (deploy/README.md, "Access model"):

- **Connecting.** The socket is created mode 0600, or 0660 and owned by ``--socket-group``; the
  kernel refuses anyone else. The pager then checks the peer's credentials (SO_PEERCRED and
  SO_PEERGROUPS): it is admitted if its uid is root, the pager's own or an ``--allow-uid``, or
  if its primary or any supplementary group is an ``--allow-gid`` or the ``--socket-group``.
- **Spaces.** Which address space a client is served from is decided here, never by the client
  alone. Root and the pager's own user may use any space: they can read the cluster token, and
  with it every space on the memory node, so limiting them would protect nothing. Every other
  admitted peer gets the pager's ``--space`` (naming it, or naming none) and nothing else,
  unless ``--allow-space`` rules matching its uid or groups grant more (then exactly those
  spaces: ``--space`` is only the name used when a client names none, and must be granted).
  A rule is ``uid=N:PATTERNS``, ``user=NAME:...``, ``gid=N:...``, ``group=NAME:...`` or
  ``any:...``; PATTERNS is a comma list of space names or shell globs (``vm-*``), and ``{uid}``
  in a pattern stands for the peer's uid (``any:vm-{uid}-*``: each user its own spaces).
"""

from __future__ import annotations

import array
import fnmatch
import grp
import logging
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field

from pager.core.region import Region
from pager.errors import ConfigError, HandoffError

log = logging.getLogger(__name__)

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
MAX_GROUPS = 256  # Python caps getsockopt buffers at 1024 bytes


@dataclass(frozen=True)
class Peer:
    """A connected client's credentials, as the kernel reports them."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        groups: frozenset[int] = frozenset()
        try:
            graw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, MAX_GROUPS * 4)
            a = array.array("I")
            a.frombytes(graw[: len(graw) - len(graw) % 4])
            groups = frozenset(a)
        except OSError as exc:  # kernels before 4.13: the primary group only
            log.debug("SO_PEERGROUPS unavailable (%s); checking the primary group only", exc)
        return cls(pid, uid, gid, groups)

    @property
    def all_gids(self) -> frozenset[int]:
        return self.groups | {self.gid}

    def describe(self) -> str:
        return f"pid {self.pid} uid {self.uid} gid {self.gid}"


def resolve_uid(text: str | int) -> int:
    """A uid from a number or a user name (ConfigError naming it otherwise)."""
    if isinstance(text, int) or str(text).isdigit():
        return int(text)
    try:
        return pwd.getpwnam(str(text)).pw_uid
    except KeyError:
        raise ConfigError(f"unknown user {text!r}; give a user name that exists or a numeric "
                          "uid") from None


def resolve_gid(text: str | int) -> int:
    """A gid from a number or a group name (ConfigError naming it otherwise)."""
    if isinstance(text, int) or str(text).isdigit():
        return int(text)
    try:
        return grp.getgrnam(str(text)).gr_gid
    except KeyError:
        raise ConfigError(f"unknown group {text!r}; create it (groupadd --system {text}) or "
                          "give a numeric gid") from None


@dataclass(frozen=True)
class SpaceRule:
    """One ``--allow-space`` rule: which peers (``kind``/``ident``) may use which spaces."""

    text: str
    kind: str  # "uid", "gid" or "any"
    ident: int | None
    patterns: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> SpaceRule:
        who, sep, pats = text.partition(":")
        patterns = tuple(p.strip() for p in pats.split(",") if p.strip())
        if not sep or not patterns:
            raise ConfigError(f"--allow-space {text!r}: write WHO:SPACES, e.g. "
                              "uid=1000:vm-a,vm-b, group=kvm:vm-*, any:vm-{uid}")
        key, _, value = who.partition("=")
        if key == "any" and not value:
            return cls(text, "any", None, patterns)
        if key in ("uid", "user") and value:
            return cls(text, "uid", resolve_uid(value), patterns)
        if key in ("gid", "group") and value:
            return cls(text, "gid", resolve_gid(value), patterns)
        raise ConfigError(f"--allow-space {text!r}: WHO must be uid=N, user=NAME, gid=N, "
                          "group=NAME or any")

    def matches(self, peer: Peer) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "uid":
            return peer.uid == self.ident
        return self.ident in peer.all_gids

    def grants(self, peer: Peer, space: str) -> bool:
        return self.matches(peer) and any(
            fnmatch.fnmatchcase(space, p.replace("{uid}", str(peer.uid))) for p in self.patterns)


@dataclass
class AccessPolicy:
    """Admission (uid/gid) and space checks for every handshake; see the module docstring."""

    default_space: str = "default"
    allowed_uids: set[int] = field(default_factory=lambda: {0, os.getuid()})
    allowed_gids: set[int] = field(default_factory=set)
    rules: list[SpaceRule] = field(default_factory=list)
    trusted_uids: set[int] = field(default_factory=lambda: {0, os.getuid()})

    def admit(self, peer: Peer) -> None:
        """Raise HandoffError unless the peer may connect at all."""
        if peer.uid in self.allowed_uids or peer.all_gids & self.allowed_gids:
            return
        gids = f" or gid in {sorted(self.allowed_gids)}" if self.allowed_gids else ""
        raise HandoffError(f"peer uid {peer.uid} is not allowed (pid {peer.pid}, gid "
                           f"{peer.gid}; admitted: uid in "
                           f"{sorted(self.allowed_uids)}{gids}); run the client as the "
                           "pager's user or root, or start the pager with --allow-uid, "
                           "--allow-gid or --socket-group")

    def space_allowed(self, peer: Peer, space: str) -> bool:
        if peer.uid in self.trusted_uids:
            return True
        if not any(r.matches(peer) for r in self.rules):
            return space == self.default_space
        return any(r.grants(peer, space) for r in self.rules)

    def check_spaces(self, peer: Peer, regions: list[Region]) -> None:
        """Raise HandoffError naming the first space this peer may not use."""
        for i, r in enumerate(regions):
            space = r.space if r.space is not None else self.default_space
            if self.space_allowed(peer, space):
                continue
            named = "names" if r.space is not None else "defaults to"
            mine = [x.text for x in self.rules if x.matches(peer)]
            if not mine:
                rule = (f"no --allow-space rule matches this peer, so it may use only the "
                        f"pager's --space {self.default_space!r}; grant more with "
                        f"--allow-space uid={peer.uid}:{space}")
            else:
                rule = (f"its --allow-space rules ({', '.join(mine)}) do not grant it; add "
                        f"one, e.g. --allow-space uid={peer.uid}:{space}")
            raise HandoffError(f"peer {peer.describe()} may not use space {space!r} (region "
                               f"{i} {named} it): {rule}")

    def describe(self) -> str:
        who = f"uids {sorted(self.allowed_uids)}"
        if self.allowed_gids:
            who += f" and gids {sorted(self.allowed_gids)}"
        spaces = "; ".join(r.text for r in self.rules) or f"{self.default_space!r} only"
        return (f"peers {who} may connect; uids {sorted(self.trusted_uids)} may use any "
                f"space, others {spaces}")
