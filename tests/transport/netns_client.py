"""Client side of the namespace test, run inside a namespace:
``python -m tests.transport.netns_client ENDPOINT TOKEN_FILE``.

Connects through `TransportManager` (its announcement and warnings go to stderr), then keeps
working: stores and fetches 4 MiB with every byte checked. Prints one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import sys

from transport.manager import TransportManager
from transport.tcp import run
from transport.token import load_token


async def main(endpoint: str, token_file: str) -> dict[str, object]:
    mgr = TransportManager("pager-a", load_token(token_file), space="vmns")
    info = await mgr.connect_peer("node-b", endpoint)
    data = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() * 128 for i in range(1024))
    await mgr.send_pages(0, data, "node-b")
    pages = await mgr.fetch_pages(0, 1024, "node-b")
    single = await mgr.fetch_page(77 * 4096, "node-b")
    await mgr.close()
    return {"transport": info.transport, "tier": info.tier.value, "rtt_us": info.rtt_s * 1e6,
            "gbps": info.bandwidth_gbps, "interface": info.interface,
            "link_mbps": info.link_mbps, "warnings": info.warnings,
            "content_ok": bytes(pages.data) == data and single == data[77 * 4096:78 * 4096]}


if __name__ == "__main__":
    print(json.dumps(run(main(sys.argv[1], sys.argv[2]))))
