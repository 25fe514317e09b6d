"""gateway/aiohttp_adapter.py's own logic, on aiohttp's real objects (no sockets needed)."""

from __future__ import annotations

import asyncio

from aiohttp.base_protocol import BaseProtocol

from gateway.aiohttp_adapter import StreamReader, complete_body, multidict_freelist_clear


class _Reading(BaseProtocol):
    """A protocol that counts the parsing steps a read of the body would ask for."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.resumed = 0

    def resume_reading(self, resume_parser: bool = True) -> None:
        self.resumed += 1


def _reader(chunks: list[bytes], *, eof: bool = True) -> tuple[StreamReader, _Reading]:
    loop = asyncio.get_running_loop()
    protocol = _Reading(loop)
    reader = StreamReader(protocol, 2 ** 16, loop=loop)
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    protocol.resumed = 0  # feed_eof asks once; what matters is what the read asks
    return reader, protocol


async def test_a_complete_body_is_taken_whole_without_a_parsing_step() -> None:
    for chunks in ([b"x" * 4096], [b"ab", b"cd", b"ef"]):
        reader, protocol = _reader(chunks)
        assert complete_body(reader) == b"".join(chunks)
        assert protocol.resumed == 0
        # The reader is left as a read leaves it: empty, at EOF, its count kept.
        assert reader.is_eof() and reader.at_eof()
        assert reader.read_nowait(-1) == b""
        assert reader.total_bytes == len(b"".join(chunks))


async def test_a_body_still_on_its_way_or_read_from_is_left_to_read_nowait() -> None:
    reader, _ = _reader([b"partial"], eof=False)
    assert complete_body(reader) is None
    assert reader.read_nowait(-1) == b"partial"  # untouched

    reader, _ = _reader([b"abcdef"])
    assert reader.read_nowait(2) == b"ab"
    assert complete_body(reader) is None
    assert reader.read_nowait(-1) == b"cdef"

    reader, _ = _reader([b"abc"])
    reader.set_exception(ValueError("cut short"))
    assert complete_body(reader) is None


def test_multidict_free_lists_can_be_emptied() -> None:
    """The installed multidict (its C build, as pip installs it) still has the private call
    ``gateway/memory.py`` uses after a crowd, and the call runs: a release that drops it
    would otherwise leave the crowd's dicts parked without a word."""
    import multidict

    clear = multidict_freelist_clear()
    if not getattr(multidict, "USE_EXTENSIONS", True):  # pure-Python build: nothing to clear
        assert clear is None
        return
    assert clear is not None
    for _ in range(100):
        multidict.CIMultiDict({"a": "1"})
    clear()
