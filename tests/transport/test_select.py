"""create_transport(): every way RDMA can be missing falls back to TCP with one warning line.

Each case runs in a fresh interpreter so the import state is real: the verbs extension
(`transport.rdma_c._rdma_cffi`) loaded for real (no RDMA device in this kernel:
ibv_get_device_list fails with ENOSYS), the extension not importable at all, and a backend
failing with an exception that is not a transport error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from transport.manager import link_speed_mbps, slow_link, slow_link_warnings

ROOT = Path(__file__).resolve().parents[2]
VERBS_BUILT = any((ROOT / "transport" / "rdma_c").glob("_rdma_cffi*.so"))

CLIENT = textwrap.dedent("""
    import json, logging, sys
    if sys.argv[3] == "none":  # the extension cannot be imported (libibverbs missing)
        sys.modules["transport.rdma_c._rdma_cffi"] = None
    import transport.rdma_c.conn as conn
    if sys.argv[3] == "fail":  # a backend failing with something not a TransportError
        def load():
            raise RuntimeError("verbs provider crashed")
        conn.load = load
        import transport.rdma as rdma
        rdma.rdma_devices = lambda: load()
    from transport import create_transport
    from transport.tcp import run
    from transport.token import load_token

    async def main():
        t = await create_transport(sys.argv[1], load_token(sys.argv[2]), space="sel",
                                   node_id="n1")
        page = await t.fetch_page(0, "n1")
        t2 = await create_transport(sys.argv[1], load_token(sys.argv[2]), node_id="n1")
        await t.close(); await t2.close()
        return {"name": t.name, "page": len(page),
                "root_handlers": len(logging.getLogger().handlers)}

    print(json.dumps(run(main())))
""")


def run_client(memnode, mode: str, env_extra: dict[str, str] | None = None
               ) -> tuple[dict[str, object], str]:
    env = dict(os.environ)
    env.pop("SSI_PAGER_RDMA_LOOPBACK", None)
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", CLIENT, memnode.endpoint,
                          str(memnode.token_file), mode], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.skipif(not VERBS_BUILT, reason="the verbs extension is not built (no headers)")
def test_verbs_without_device_falls_back(memnode):
    result, err = run_client(memnode, "verbs")
    assert result["name"] == "tcp" and result["page"] == 4096
    lines = [line for line in err.splitlines() if "not RDMA" in line]
    assert len(lines) == 1, err  # one warning for two transports
    assert "ibv_get_device_list" in lines[0] and "RDMA NIC" in lines[0]
    assert result["root_handlers"] == 0


def test_rdma_extension_missing_falls_back(memnode):
    result, err = run_client(memnode, "none")
    assert result["name"] == "tcp"
    lines = [line for line in err.splitlines() if "not RDMA" in line]
    assert len(lines) == 1 and "RDMA extension does not load" in lines[0], err
    assert "libibverbs" in lines[0]


def test_a_backend_failing_in_any_way_falls_back(memnode):
    result, err = run_client(memnode, "fail")
    assert result["name"] == "tcp" and result["page"] == 4096
    lines = [line for line in err.splitlines() if "not RDMA" in line]
    assert len(lines) == 1 and "RuntimeError: verbs provider crashed" in lines[0], err


def test_prefer_rdma_raises_clearly(memnode):
    from transport.errors import RdmaUnavailable
    from transport.factory import create_transport
    from transport.tcp import run

    with pytest.raises(RdmaUnavailable, match="RDMA"):
        run(create_transport(memnode.endpoint, memnode.token, prefer="rdma"))


def test_link_speed_and_warnings(tmp_path):
    for name, speed in (("eth1g", "1000"), ("eth25g", "25000"), ("weird", "-1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "speed").write_text(speed + "\n")
    assert link_speed_mbps("eth1g", tmp_path) == 1000
    assert link_speed_mbps("weird", tmp_path) is None
    assert link_speed_mbps("missing", tmp_path) is None
    w = slow_link_warnings("n1", "eth1g", 1000, 0.9)
    assert len(w) == 1 and "1 Gbps network detected" in w[0] and "10G" in w[0]
    assert slow_link_warnings("n1", "eth25g", 25000, 20.0) == []
    assert "0.50 Gbit/s measured" in slow_link_warnings("n1", "veth0", 10000, 0.5)[0]
    assert slow_link_warnings("n1", "lo", None, 0.1) == []
    # what is warned about is what bulk lanes compress on
    assert slow_link("eth1g", 1000, 9.0) and slow_link("veth0", 10000, 0.5)
    assert not slow_link("eth25g", 25000, 20.0) and not slow_link("lo", None, 0.1)


def test_manager_announces_once_per_peer(memnode, capsys):
    """Announced once per peer, and the tier announced is the tier the manager reports after
    a second measurement (hysteresis: one more sample cannot flip it, whatever the noise; the
    hysteresis itself is tested with given samples in test_tiers.py)."""
    import re

    from transport.base import TransportTier
    from transport.manager import TransportManager
    from transport.tcp import run

    async def main() -> TransportTier:
        mgr = TransportManager("pager1", memnode.token, space="mgr", prefer="tcp")
        info = await mgr.connect_peer("node1", memnode.endpoint)
        assert info.interface == "lo" and info.warnings == []
        assert info.tier is TransportTier.from_latency(info.rtt_s)  # a first sample decides
        again = await mgr.connect_peer("node1", memnode.endpoint)  # reconnect: no second line
        await mgr.send_page(0, b"m" * 4096, "node1")
        assert await mgr.fetch_page(0, "node1") == b"m" * 4096
        tier = mgr.performance_tier("node1")
        assert tier is info.tier is again.tier
        await mgr.close()
        return tier

    tier = run(main())
    err = capsys.readouterr().err
    lines = re.findall(r"transport: tcp to node1 \(127\.0\.0\.1:\d+\) tier=(\w+)", err)
    assert lines == [tier.value], err
    assert "expected latency ~" in err and "network detected" not in err
