"""Leased keys in a real etcd (the test's own server): an owner key outlives an etcd restart,
a node name another live node holds is refused, a deleted registration is put back."""

from __future__ import annotations

import json
import logging
import time

import pytest
from clusterkit import wait_until

from transport.leases import Ownership, register_node
from transport.membership import NODES, OWNERS, ClusterError, etcd_client


def test_owner_key_survives_an_etcd_restart(etcd, caplog):
    caplog.set_level(logging.INFO, logger="transport.leases")
    owner = Ownership.acquire(etcd.url, "ez", "p1", ttl=3)
    try:
        etcd.stop()
        time.sleep(3)  # several renewal rounds fail meanwhile
        etcd.start()  # same data dir: etcd kept the lease
        time.sleep(3 + 2)  # past the lease TTL: renewed rounds, or the key would be gone
        got = etcd_client(etcd.url).get(OWNERS + "ez")
        assert got, "the owner key is gone"
        doc = json.loads(got[0])
        assert (doc["pager"], doc["epoch"]) == ("p1", owner.epoch)
        assert "taken by" not in caplog.text
        assert "renewing the lease of /ssi-pager/owners/ez failed (" in caplog.text
        assert "failed ()" not in caplog.text
    finally:
        owner.close()


def test_a_name_held_by_a_live_node_is_refused(etcd):
    first = register_node(etcd.url, "n1", "127.0.0.1:1111", ttl=2)
    try:
        t0 = time.monotonic()
        with pytest.raises(ClusterError) as refused:
            register_node(etcd.url, "n1", "127.0.0.1:2222", ttl=2)
        assert time.monotonic() - t0 < 10
        assert "n1" in str(refused.value) and "127.0.0.1:1111" in str(refused.value)
        # the refused one took nothing over
        got = etcd_client(etcd.url).get(NODES + "n1")
        assert json.loads(got[0])["endpoint"] == "127.0.0.1:1111"
    finally:
        first.close()
    second = register_node(etcd.url, "n1", "127.0.0.1:2222", ttl=2)
    try:
        got = etcd_client(etcd.url).get(NODES + "n1")
        assert json.loads(got[0])["endpoint"] == "127.0.0.1:2222"
    finally:
        second.close()


def test_a_node_restarted_after_kill_9_waits_out_its_old_registration(etcd):
    client = etcd_client(etcd.url)
    old = client.lease(ttl=2)  # the killed node's: never renewed again
    client.put(NODES + "n1", json.dumps({"endpoint": "127.0.0.1:1111", "boot": "x"}),
               lease=old)
    reg = register_node(etcd.url, "n1", "127.0.0.1:1111", ttl=2)
    try:
        assert json.loads(client.get(NODES + "n1")[0])["boot"] != "x"
    finally:
        reg.close()


def test_a_deleted_registration_is_put_back(etcd):
    reg = register_node(etcd.url, "n1", "127.0.0.1:1111", ttl=2)
    client = etcd_client(etcd.url)
    try:
        assert client.delete(NODES + "n1")
        wait_until(lambda: client.get(NODES + "n1"), 5, "the registration to come back")
        assert json.loads(client.get(NODES + "n1")[0])["endpoint"] == "127.0.0.1:1111"
        # overwritten behind its back (another node's put): ours again as well
        client.put(NODES + "n1", json.dumps({"endpoint": "127.0.0.1:9999"}))
        wait_until(lambda: json.loads(client.get(NODES + "n1")[0])["endpoint"]
                   == "127.0.0.1:1111", 5, "the registration to be ours again")
    finally:
        reg.close()
    wait_until(lambda: not client.get(NODES + "n1"), 5, "the revoked key to go")
