"""parse_regions / check_fds / message_complete: the handshake as bytes, no sockets."""

import json

import pytest

from pager.errors import HandoffError
from pager.service.handoff import MAX_MESSAGE, check_fds, message_complete, parse_regions

K = 4096


def body(*regions):
    return json.dumps(list(regions)).encode()


def test_page_size_keys_and_unknown_keys():
    r = parse_regions(body(
        {"base_host_virt_addr": 0x10000, "size": 2 * K, "offset": 0, "page_size": 8192,
         "page_size_kib": 4096, "whatever": [1, 2]},
        {"base_host_virt_addr": 0x40000, "size": K, "offset": 2 * K, "page_size_kib": 4096},
        {"base_host_virt_addr": 0x50000, "size": K, "offset": 3 * K, "space": "vm7",
         "memfd": True},
    ))
    assert [x.page_size for x in r] == [8192, 4096, 4096]
    assert r[2].space == "vm7" and r[2].memfd and r[0].space is None


@pytest.mark.parametrize("raw,match", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"{}", "non-empty JSON array"),
    (b"[]", "non-empty JSON array"),
    (b"[1]", "not a JSON object"),
    (body({"size": K, "offset": 0}), "lacks 'base_host_virt_addr'"),
    (body({"base_host_virt_addr": 0x1000, "size": -4096, "offset": 0}), "non-negative"),
    (body({"base_host_virt_addr": 0x1000, "size": "4096", "offset": 0}), "non-negative"),
    (body({"base_host_virt_addr": 0x1000, "size": 0, "offset": 0}), "empty"),
    (body({"base_host_virt_addr": 0x1001, "size": K, "offset": 0}), "aligned"),
    (body({"base_host_virt_addr": 0x1000, "size": K, "offset": 0, "space": 3}), "space"),
    (body({"base_host_virt_addr": 0x1000, "size": 2 * K, "offset": 0},
          {"base_host_virt_addr": 0x2000, "size": K, "offset": 0}), "overlaps"),
    (b"[" + b" " * MAX_MESSAGE + b"]", "exceeds"),
])
def test_malformed(raw, match):
    with pytest.raises(HandoffError, match=match):
        parse_regions(raw)


def test_fd_count():
    plain = parse_regions(body({"base_host_virt_addr": 0x1000, "size": K, "offset": 0}))
    check_fds(plain, [5])
    for fds in ([], [5, 6]):
        with pytest.raises(HandoffError, match="fds"):
            check_fds(plain, fds)
    mem = parse_regions(body({"base_host_virt_addr": 0x1000, "size": K, "offset": 0,
                              "memfd": True}))
    check_fds(mem, [5, 6])
    with pytest.raises(HandoffError, match="memfd"):
        check_fds(mem, [5])


def test_message_complete():
    full = body({"base_host_virt_addr": 0x1000, "size": K, "offset": 0, "space": "a]b"})
    for i in range(1, len(full)):
        assert not message_complete(full[:i]), full[:i]
    assert message_complete(full)
    assert message_complete(b"garbage")  # not an array: parse at once and refuse
    assert not message_complete(b"   ")
