"""Memory nodes on a LAN found over mDNS (python-zeroconf), opt-in on both sides.

``memnode --announce`` publishes the service ``NAME._ssi-pager._tcp.local.`` with the node's
endpoint and boot id in its TXT record (`Announcement`); ``serve --discover`` browses for
them (`DiscoveryMembership`) and follows nodes as they come and go (a clean stop says
goodbye at once; a vanished node's record expires). Discovery names nodes, it does not trust
them: the cluster token still authenticates every connection.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from transport.membership import ClusterError, Membership
from transport.tcp import parse_endpoint

log = logging.getLogger(__name__)

SERVICE = "_ssi-pager._tcp.local."


def _zeroconf() -> Any:
    try:
        import zeroconf
    except ImportError as exc:
        raise ClusterError("mDNS discovery needs python-zeroconf: pip install zeroconf") \
            from exc
    return zeroconf


class Announcement:
    """This memory node's mDNS service record, withdrawn by ``close()``."""

    def __init__(self, name: str, endpoint: str) -> None:
        zc = _zeroconf()
        host, port = parse_endpoint(endpoint)
        if host in ("0.0.0.0", "::", ""):
            raise ClusterError(f"--announce: {endpoint} is no address peers can reach; give "
                               f"--advertise HOST:PORT")
        self.info = zc.ServiceInfo(
            SERVICE, f"{name}.{SERVICE}", addresses=[socket.inet_aton(host)], port=port,
            properties={"endpoint": endpoint, "boot": os.urandom(8).hex()})
        self.zc = zc.Zeroconf()
        try:
            self.zc.register_service(self.info)
        except Exception as exc:
            self.zc.close()
            why = str(exc) or type(exc).__name__
            raise ClusterError(f"cannot announce {name} over mDNS: {why} (another node with "
                               f"that --name on the LAN?)") from exc
        log.info("mDNS: announced %s at %s", name, endpoint)

    def close(self) -> None:
        try:
            self.zc.unregister_service(self.info)
        finally:
            self.zc.close()


class DiscoveryMembership(Membership):
    """Memory nodes announced over mDNS; waits up to ``wait`` seconds for a first one."""

    def __init__(self, *, wait: float = 3.0) -> None:
        zc = _zeroconf()
        self.source = "mDNS " + SERVICE
        self._nodes: dict[str, str] = {}
        self._boots: dict[str, str] = {}
        self._callbacks: list[Callable[[dict[str, str]], None]] = []
        self._lock = threading.Lock()
        self._found = threading.Event()
        self.zc = zc.Zeroconf()
        self.browser = zc.ServiceBrowser(self.zc, SERVICE, handlers=[self._on_service])
        if not self._found.wait(wait):
            self.close()
            raise ClusterError(f"no memory node announced itself over mDNS within {wait:g} s: "
                               f"start them with `memnode --announce` on this LAN, or name "
                               f"them with --memnode / --etcd")
        time.sleep(min(wait, 0.5))  # the others answer the same query within milliseconds

    def _on_service(self, zeroconf: Any, service_type: str, name: str,
                    state_change: Any) -> None:
        zc = _zeroconf()
        node = name.removesuffix("." + SERVICE)
        if state_change is zc.ServiceStateChange.Removed:
            with self._lock:
                changed = self._nodes.pop(node, None) is not None
            if changed:
                log.info("mDNS: memory node %s left", node)
                self._notify()
            return
        info = zeroconf.get_service_info(service_type, name, timeout=2000)
        if info is None:
            return
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        endpoint = props.get("endpoint")
        if not endpoint:
            return
        with self._lock:
            changed = (self._nodes.get(node), self._boots.get(node)) != (endpoint,
                                                                         props.get("boot"))
            self._nodes[node], self._boots[node] = endpoint, props.get("boot", "")
        self._found.set()
        if changed:
            log.info("mDNS: memory node %s at %s", node, endpoint)
            self._notify()

    def _notify(self) -> None:
        nodes = self.nodes()
        for cb in self._callbacks:
            cb(nodes)

    def nodes(self) -> dict[str, str]:
        with self._lock:
            return dict(self._nodes)

    def boot(self, node_id: str) -> str | None:
        return self._boots.get(node_id)

    def on_change(self, callback: Callable[[dict[str, str]], None]) -> None:
        self._callbacks.append(callback)

    def close(self) -> None:
        self.browser.cancel()
        self.zc.close()
