"""etcd keys under leases, renewed by a thread: a memory node's registration
(``/ssi-pager/nodes/NAME``, `register_node`) and a pager's ownership of an address space
(``/ssi-pager/owners/SPACE`` with its epoch counter, `Ownership`). The membership that reads
them is `transport.membership`."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from transport.membership import (
    DEFAULT_TTL,
    EPOCHS,
    NODES,
    OWNERS,
    ClusterError,
    _etcd_errors,
    _start,
    _why,
    etcd_client,
)

log = logging.getLogger(__name__)


class KeyHeld(ClusterError):
    """A leased key holds another registrant's value (``holder``) under a live lease."""

    def __init__(self, key: str, holder: str) -> None:
        super().__init__(f"{key} is held by {holder}")
        self.holder = holder


class LeasedKey:
    """A key in etcd under a lease renewed by a thread; ``close()`` revokes it (the key goes
    at once). A transient etcd error keeps the lease (etcd keeps leases across a restart):
    only a lease etcd says is gone is replaced, and the key is read every round.

    ``exclusive`` (an owner): the key is taken over at once, and comes back later only while
    it is free or still holds our value. Otherwise (a node's name) the first registration
    waits out another holder's lease and raises `KeyHeld` if it lives on, and the key is put
    back whenever it vanishes or is overwritten while our lease lives."""

    def __init__(self, url: str, key: str, value: dict[str, Any], *, ttl: int = DEFAULT_TTL,
                 client: Any = None, exclusive: bool = False) -> None:
        self.client = client or etcd_client(url)
        self.url, self.key, self.ttl, self.exclusive = url, key, ttl, exclusive
        self.value = json.dumps({**value, "host": socket.gethostname()})
        self.lease: Any = None  # set while the key is ours
        self._failing = False  # an etcd error was logged: said once per outage
        self._held = False  # "held by someone else" was logged: said once
        self.on_taken: Callable[[str], None] | None = None  # an exclusive key taken over
        self._stop = threading.Event()
        self._thread = _start(self._first, self._renew, "etcd-lease",
                              f"cannot write {key} to etcd at {url}")

    def _first(self) -> None:
        lease = self.client.lease(ttl=self.ttl)
        try:
            if self.exclusive:
                self.client.put(self.key, self.value, lease=lease)
            else:
                self._wait_out(lease)
        except BaseException:
            _revoke(lease)
            raise
        self.lease = lease
        log.info("etcd: registered %s (lease ttl %ds)", self.key, self.ttl)

    def _wait_out(self, lease: Any) -> None:
        """Claim the key under ``lease``, waiting up to its holder's lease TTL for it to go
        (a node restarted after kill -9 finds its own old registration)."""
        from etcd3gw.lease import Lease

        held = self._claim(lease)
        if held is None:
            return
        holder_lease = int(held[1].get("lease", 0))  # 0: none, the key never expires
        if holder_lease:  # + 2 s: the TTL is in whole seconds, and expired leases are
            # revoked every 0.5 s
            deadline = time.monotonic() + max(Lease(holder_lease, self.client).ttl(), 0) + 2
        while holder_lease and time.monotonic() < deadline:
            time.sleep(0.2)
            lease.refresh()  # ours must outlive the wait
            if (held := self._claim(lease)) is None:
                return
        raise KeyHeld(self.key, held[0])

    def _claim(self, lease: Any) -> tuple[str, dict[str, Any]] | None:
        """Put our value under ``lease`` if the key is free or holds our value (etcd kept it
        across a restart, or under a lease of ours that lapsed); else (value, metadata) of
        the one there."""
        for _ in range(3):  # the key may go between the create and the get
            if self.client.create(self.key, self.value, lease=lease):
                return None
            got = self.client.get(self.key, metadata=True)
            if got and got[0][0].decode() != self.value:
                return got[0][0].decode(), got[0][1]
            if got and self._put_if_ours(lease):
                return None
        raise ValueError(f"{self.key} keeps changing")

    def _put_if_ours(self, lease: Any) -> bool:
        """Our value, under ``lease``, if the key still holds it."""
        key = _b64(self.key)
        return bool(self.client.transaction({
            "compare": [{"key": key, "result": "EQUAL", "target": "VALUE",
                         "value": _b64(self.value)}],
            "success": [{"request_put": {"key": key, "value": _b64(self.value),
                                         "lease": lease.id}}],
            "failure": []}).get("succeeded"))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self.lease is None or self.lease.refresh() <= 0:
                    self._register()  # the lease is gone (etcd said so): a new one
                else:
                    self._check()
                if self._failing:
                    log.info("etcd at %s answers again (%s)", self.url, self.key)
                self._failing = False
            except _etcd_errors() as exc:
                if not self._failing:  # the lease is kept: refreshed again next round
                    log.warning("etcd: renewing the lease of %s failed (%s); trying again "
                                "every %.1f s", self.key, _why(exc), self.ttl / 3)
                self._failing = True

    def _register(self) -> None:
        """The key under a new lease, unless someone else holds it."""
        self.lease = None
        lease = self.client.lease(ttl=self.ttl)
        try:
            held = self._claim(lease)
        except BaseException:
            _revoke(lease)
            raise
        if held is None:
            self.lease, self._held = lease, False
            log.info("etcd: registered %s again (lease ttl %ds)", self.key, self.ttl)
            if self._stop.is_set():  # closed meanwhile
                _revoke(lease)
            return
        _revoke(lease)
        self._taken(held[0])

    def _check(self) -> None:
        """Our lease lives: is the key still there with our value?"""
        got = self.client.get(self.key)
        holder = got[0].decode() if got else None
        if holder == self.value:
            return
        if holder is not None and self.exclusive:
            self._taken(holder)
            return
        log.warning("etcd: %s %s: registering it again", self.key,
                    f"was overwritten by {holder}" if holder else "was deleted")
        if self.exclusive:  # vanished: ours again only if still free
            self.client.create(self.key, self.value, lease=self.lease)
        else:
            self.client.put(self.key, self.value, lease=self.lease)

    def _taken(self, holder: str) -> None:
        """Someone else holds the key: an owner gives it up; a node waits for it to go."""
        if self.exclusive:
            log.error("etcd: %s was taken by %s: not renewing it (nodes refuse our stores "
                      "once they are fenced)", self.key, holder)
            self._stop.set()
            _revoke(self.lease)
            self.lease = None
            if self.on_taken is not None:
                self.on_taken(holder)
        elif not self._held:
            log.error("etcd: %s is held by %s: registering it once that goes", self.key,
                      holder)
            self._held = True

    def close(self) -> None:
        self._stop.set()
        _revoke(self.lease)


def _revoke(lease: Any) -> None:
    try:
        if lease is not None:
            lease.revoke()
    except _etcd_errors():
        log.debug("revoking the lease failed", exc_info=True)


def register_node(url: str, name: str, endpoint: str, *, ttl: int = DEFAULT_TTL) -> LeasedKey:
    """A memory node's registration: ``/ssi-pager/nodes/NAME`` -> endpoint and a boot id
    (new at every start: pagers re-sync a node that restarted). A name another live node
    holds is refused (`ClusterError`)."""
    try:
        return LeasedKey(url, NODES + name, {"endpoint": endpoint,
                                             "boot": os.urandom(8).hex()}, ttl=ttl)
    except KeyHeld as exc:
        try:
            other = json.loads(exc.holder).get("endpoint", "?")
        except (ValueError, AttributeError):
            other = exc.holder
        raise ClusterError(f"memory node name {name} is already registered in etcd at {url} "
                           f"by the live node at {other}: give this node another --name, or "
                           f"stop that node first") from None


class Ownership:
    """This pager owns ``space`` under ``epoch``: from etcd (`acquire`, a key under a lease
    renewed by a thread; the epoch counter only grows) or fixed (a static file's owner)."""

    def __init__(self, space: str, epoch: int, pager: str, registration: Any = None) -> None:
        self.space, self.epoch, self.pager = space, epoch, pager
        self._reg = registration

    @classmethod
    def acquire(cls, url: str, space: str, pager: str, *, ttl: int = DEFAULT_TTL) -> Ownership:
        """Take ``space`` over: the next epoch, whoever owned it before (a guest resumed
        here); the previous owner's stores are refused from now on by every node fenced."""
        client = etcd_client(url)
        try:
            for _ in range(100):
                got = client.get(EPOCHS + space, metadata=True)
                if got:
                    value, meta = got[0]
                    epoch = int(value) + 1
                    compare = {"key": _b64(EPOCHS + space), "result": "EQUAL",
                               "target": "MOD", "mod_revision": int(meta["mod_revision"])}
                else:
                    epoch = 1
                    compare = {"key": _b64(EPOCHS + space), "result": "EQUAL",
                               "target": "CREATE", "create_revision": 0}
                txn = {"compare": [compare], "success": [{"request_put": {
                    "key": _b64(EPOCHS + space), "value": _b64(str(epoch))}}], "failure": []}
                if client.transaction(txn).get("succeeded"):
                    break
            else:
                raise ClusterError(f"could not take space {space} over in etcd: too many "
                                   f"concurrent owners")
            old = client.get(OWNERS + space)
            if old:
                log.warning("etcd: taking space %s over from %s (epoch %d)", space,
                            old[0].decode(), epoch)
            # taken over at once; later it comes back only if free or still ours
            reg = LeasedKey(url, OWNERS + space, {"pager": pager, "epoch": epoch}, ttl=ttl,
                            client=client, exclusive=True)
        except _etcd_errors() as exc:
            raise ClusterError(f"cannot take space {space} over in etcd at {url}: {_why(exc)}; is "
                               f"etcd running there?") from exc
        return cls(space, epoch, pager, reg)

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(why)`` once another pager takes the space over (seen in etcd)."""
        if self._reg is not None:
            self._reg.on_taken = lambda holder: callback(
                f"etcd says {OWNERS + self.space} is held by {holder}")

    def close(self) -> None:
        if self._reg is not None:
            self._reg.close()


def _b64(text: str) -> str:

    return base64.b64encode(text.encode()).decode()
