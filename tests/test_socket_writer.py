"""SocketWriter on real sockets: chunk framing, never blocking, handing back what the socket did not take, and never
writing to a descriptor number the loop closed and the kernel gave to another connection."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from innova_smollm.socket_writer import SocketWriter


class FakeTransport(asyncio.WriteTransport):
    """Only the parts SocketWriter reads: a socket, a buffer size, a closing flag (pure logic around a real socket)."""

    def __init__(self, sock: socket.socket, *, buffered: int = 0, closing: bool = False) -> None:
        super().__init__()
        self.sock, self.buffered, self.closing, self.written = sock, buffered, closing, b""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"socket": self.sock}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    server.setblocking(False)
    yield server, client
    server.close()
    client.close()


def read_available(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return received
        if not data:
            return received
        received += data


def test_chunks_are_framed_as_http_1_1_chunks(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    writer = SocketWriter.for_transport(FakeTransport(server))
    assert writer is not None
    assert writer.write_chunk(b"data: {}\n\n") == b""
    assert writer.write_chunk(b"x" * 300) == b""
    writer.close()
    assert read_available(client) == b"a\r\ndata: {}\n\n\r\n" + b"12c\r\n" + b"x" * 300 + b"\r\n"


def test_a_full_socket_hands_back_what_it_did_not_take_without_blocking(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = SocketWriter.for_transport(FakeTransport(server))
    assert writer is not None
    payload = b"y" * 1000
    sent = b""
    handed_back_before = SocketWriter.handed_back
    for _ in range(10_000):  # the client reads nothing: the socket must fill up long before this
        chunk = b"%x\r\n%b\r\n" % (len(payload), payload)
        unsent = writer.write_chunk(payload)
        sent += chunk[: len(chunk) - len(unsent)]
        if unsent:
            assert chunk.endswith(unsent)
            break
    else:
        pytest.fail("the socket never filled up")
    assert SocketWriter.handed_back == handed_back_before + 1
    writer.close()
    # Everything the writer said it wrote is what arrives, byte for byte.
    received = b""
    while len(received) < len(sent):
        received += client.recv(65536)
    assert received == sent


def test_after_close_nothing_is_written_even_to_a_reused_descriptor_number(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    writer = SocketWriter.for_transport(FakeTransport(server))
    assert writer is not None
    # The loop closes its connection, and the kernel gives the descriptor number to the next connection.
    number = server.fileno()
    server.close()
    other_server, other_client = socket.socketpair()
    try:
        assert number in (other_server.fileno(), other_client.fileno())
        assert writer.write_chunk(b"still the first client's") == b""
        writer.close()
        with pytest.raises(OSError):
            writer.write_chunk(b"after the end")
        assert read_available(other_client) == b""
        assert read_available(client).endswith(b"still the first client's\r\n")
    finally:
        other_server.close()
        other_client.close()


def test_a_gone_client_is_an_oserror(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    writer = SocketWriter.for_transport(FakeTransport(server))
    assert writer is not None
    client.close()
    with pytest.raises(OSError):
        writer.write_chunk(b"nobody reads this")
    writer.close()


@pytest.mark.parametrize(
    "transport_state",
    [{"buffered": 10}, {"closing": True}],
    ids=["bytes still buffered in the transport", "transport closing"],
)
def test_no_writer_while_the_loop_may_still_write(
    pair: tuple[socket.socket, socket.socket], transport_state: dict[str, int]
) -> None:
    server, _ = pair
    assert SocketWriter.for_transport(FakeTransport(server, **transport_state)) is None  # type: ignore[arg-type]


def test_no_writer_for_a_blocking_socket(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    server.setblocking(True)
    assert SocketWriter.for_transport(FakeTransport(server)) is None


def test_what_the_socket_did_not_take_is_written_through_the_transport(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _ = pair
    transport = FakeTransport(server)
    writer = SocketWriter.for_transport(transport)
    assert writer is not None
    writer.write_on_loop(b"tail")
    writer.close()
    assert transport.written == b"tail"
