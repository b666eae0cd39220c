"""Where a cluster's spaces are stored, remembered beyond one pager (`StoreRecords`): each
node's store identity for a space (`transport.wire.StoreIdentities`), recorded in the
membership (etcd: ``/ssi-pager/stores/SPACE/NODE``) once every extent is on its nodes, and
seeded into the lanes' checks before the first lane to the space opens. A node wiped, or
restarted on another store, while no pager watched thus fails its first lane instead of
answering zeros for pages it was given."""

from __future__ import annotations

import threading

from transport.membership import Membership
from transport.wire import IDENTITIES, MISSED_STORES


class StoreRecords:
    """The recorded store identities of ``membership``'s spaces; ``endpoints`` is the
    cluster's live {node id: endpoint} map (the key `IDENTITIES` checks by)."""

    def __init__(self, membership: Membership, endpoints: dict[str, str]) -> None:
        self.membership = membership
        self.endpoints = endpoints
        self._expected: set[str] = set()  # spaces whose recorded identities are seeded
        self._lock = threading.Lock()  # not the cluster's routing lock: seeding reads etcd
        self._unchecked: set[str] = set()  # spaces whose record could not be read
        self._recorded: dict[str, dict[str, tuple[str, int]]] = {}

    def expect_space(self, space: str) -> None:
        """Before the first lane to ``space``: what its writers recorded of each node's store
        is what a lane must find there (`transport.wire.StoreIdentities.expect`)."""
        if space in self._expected:
            return
        with self._lock:
            if space in self._expected:
                return
            recorded = self.membership.identities(space)
            if recorded is None:  # unreadable: this pager records none over it either
                self._unchecked.add(space)
                recorded = {}
            for node_id, ident in recorded.items():
                ep = self.endpoints.get(node_id)
                if ep is not None:
                    self._expect(ep, space, ident)
            self._recorded[space] = dict(recorded)
            self._expected.add(space)

    def expect_node(self, node_id: str, endpoint: str) -> None:
        """A node first seen after spaces were seeded: expect what was recorded of it."""
        for space, ids in list(self._recorded.items()):
            if node_id in ids and space in self._expected:
                self._expect(endpoint, space, ids[node_id])

    def _expect(self, endpoint: str, space: str, ident: tuple[str, int]) -> None:
        IDENTITIES.expect(endpoint, space, *ident,
                          f"its writers (recorded in {self.membership.source})")

    def record(self, space: str, nodes: list[str]) -> None:
        """Record the identity each of ``nodes`` showed this process for ``space``; not for
        a space whose record this pager could not read (what it saw was never checked
        against it), nor one it never opened."""
        if space in self._unchecked or space not in self._expected:
            return
        ids = {}
        for n in sorted(nodes):
            got = IDENTITIES.get(self.endpoints.get(n, n), space)
            if got is not None and got[0]:  # a node before store ids shows none
                ids[n] = got
        done = self._recorded.setdefault(space, {})
        new = {n: i for n, i in ids.items() if done.get(n) != i}
        if new and self.membership.record_identities(space, new):
            done.update(new)

    def mark_missed(self, space: str, nodes: list[str]) -> bool:
        """Record that ``nodes`` missed stores to ``space`` (they were down when a store
        reached its other targets): a pager started later refuses their copy as it does a
        wiped node's, and refills them, until this one records them refilled. False: not
        recorded (etcd unreachable); the store is not done until it is."""
        mark = {n: (MISSED_STORES, 0) for n in nodes}
        if not self.membership.record_identities(space, mark):
            return False
        # what this pager then records of them (once refilled) differs from the mark
        self._recorded.setdefault(space, {}).update(mark)
        return True
