"""Network namespaces for tests: two "hosts" joined by a veth pair, optionally rate-limited.

Usage (root needed; `unavailable()` says why not, for pytest.skip)::

    from tests.netns import two_hosts, run_in, popen_in, unavailable

    with two_hosts(rate="1gbit") as (ns_a, ip_a, ns_b, ip_b):
        server = popen_in(ns_b, ["python3", "-m", "pager.cli", "memnode", "--listen", ip_b])
        run_in(ns_a, ["ping", "-c1", ip_b], check=True)

Namespaces are named ``ssipg-<pid>-<n>a|b`` and removed on exit (which also removes the veth
pair and its qdiscs). ``rate`` (tc syntax: "1gbit", "100mbit") shapes both directions with
a tbf qdisc; ``delay`` (e.g. "200us") adds netem latency on both ends.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

SUBNET = "10.77.0"
_counter = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def unavailable() -> str | None:
    """None if namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2 (ip, tc) is not installed"
    name = f"ssipg-{os.getpid()}-probe"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace: {exc.stderr.strip()}"
    with contextlib.suppress(subprocess.CalledProcessError):
        _ip("netns", "del", name)
    return None


def run_in(ns: str, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run of ``cmd`` inside namespace ``ns``."""
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], **kw)


def popen_in(ns: str, cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen of ``cmd`` inside namespace ``ns`` (terminate it yourself)."""
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)


@contextlib.contextmanager
def two_hosts(rate: str | None = None, delay: str | None = None
              ) -> Iterator[tuple[str, str, str, str]]:
    """Yields ``(ns_a, ip_a, ns_b, ip_b)``: two namespaces linked by veth, addresses
    10.77.0.1 and 10.77.0.2 (private to the namespaces)."""
    n = next(_counter)
    ns_a, ns_b = f"ssipg-{os.getpid()}-{n}a", f"ssipg-{os.getpid()}-{n}b"
    ip_a, ip_b = f"{SUBNET}.1", f"{SUBNET}.2"
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", "ssipg-a", "netns", ns_a, "type", "veth", "peer", "name", "ssipg-b",
            "netns", ns_b)
        for ns, dev, addr in ((ns_a, "ssipg-a", ip_a), (ns_b, "ssipg-b", ip_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
            if rate or delay:
                qdisc = ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root"]
                if delay and rate:
                    qdisc += ["netem", "delay", delay, "rate", rate, "limit", "10000"]
                elif delay:
                    qdisc += ["netem", "delay", delay]
                else:
                    qdisc += ["tbf", "rate", str(rate), "burst", "256kb", "latency", "50ms"]
                subprocess.run(qdisc, check=True, capture_output=True, text=True)
        yield ns_a, ip_a, ns_b, ip_b
    finally:
        for ns in created:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns)
