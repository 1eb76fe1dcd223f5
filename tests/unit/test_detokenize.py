"""Stop strings and UTF-8 across token boundaries, and which tokens a streamed chunk carries (pure logic)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from innova_smollm.engine.detokenize import LogprobQueue, TextAssembler


def feed_all(assembler: TextAssembler, pieces: list[bytes]) -> tuple[str, bool]:
    out, stopped = [], False
    for piece in pieces:
        fed = assembler.feed(piece)
        out.append(fed.text)
        if fed.stopped:
            stopped = True
            break
    out.append(assembler.flush())
    return "".join(out), stopped


def test_a_character_split_across_tokens_comes_out_whole() -> None:
    data = "é€😀".encode()
    assembler = TextAssembler()
    texts = [assembler.feed(bytes([b])).text for b in data]
    assert "".join(texts) == "é€😀"
    assert all("\ufffd" not in t for t in texts)


def test_a_stop_string_spanning_tokens_is_cut_and_never_sent() -> None:
    assembler = TextAssembler(("END",))
    sent = [assembler.feed(p) for p in [b"Hello E", b"N", b"D and more"]]
    assert "".join(f.text for f in sent) == "Hello "
    assert sent[-1].stopped


def test_text_that_only_looked_like_a_stop_string_is_released() -> None:
    text, stopped = feed_all(TextAssembler(("END",)), [b"Hello EN", b"vy"])
    assert (text, stopped) == ("Hello ENvy", False)


def test_the_earliest_of_several_stop_strings_wins() -> None:
    text, stopped = feed_all(TextAssembler(("b", "a")), [b"xxab"])
    assert (text, stopped) == ("xx", True)


@given(st.text(max_size=60), st.lists(st.integers(min_value=1, max_value=7), max_size=30), st.sampled_from(["#", "ab"]))
def test_any_split_gives_the_text_up_to_the_first_stop(text: str, cuts: list[int], stop: str) -> None:
    data = text.encode()
    pieces, position = [], 0
    for cut in cuts:
        pieces.append(data[position : position + cut])
        position += cut
    pieces.append(data[position:])
    result, stopped = feed_all(TextAssembler((stop,)), pieces)
    expected = text.split(stop, 1)[0]
    assert result == expected
    assert stopped == (stop in text)


def chunks_with_tokens(
    pieces: list[bytes], stop: tuple[str, ...] = ()
) -> tuple[list[tuple[str, list[bytes]]], list[bytes]]:
    """Each sent chunk with the tokens the queue gives it, as the engine pairs them; and the tokens never given."""
    assembler, queue = TextAssembler(stop), LogprobQueue[bytes]()
    chunks = []
    for piece in pieces:
        fed = assembler.feed(piece)
        queue.add(piece, fed)
        if fed.text:
            chunks.append((fed.text, queue.sent(len(fed.text))))
        if fed.stopped:
            break
    tail = assembler.flush()
    if tail:
        chunks.append((tail, queue.sent(len(tail))))
    given_out = [token for _, tokens in chunks for token in tokens]
    return chunks, pieces[len(given_out) :]


def test_a_token_inside_a_character_travels_with_the_token_that_completes_it() -> None:
    euro = "€".encode()
    chunks, left = chunks_with_tokens([b"a", euro[:1], euro[1:], b"b"])
    assert chunks == [("a", [b"a"]), ("€", [euro[:1], euro[1:]]), ("b", [b"b"])]
    assert left == []
    # A token that completes one character and starts the next: its text waits for the token that completes it.
    chunks, left = chunks_with_tokens([b"a" + euro[:2], euro[2:] + b"b"])
    assert chunks == [("a€b", [b"a" + euro[:2], euro[2:] + b"b"])]


def test_tokens_held_for_a_possible_stop_string_go_with_the_text_when_it_is_released() -> None:
    chunks, left = chunks_with_tokens([b"Hello ", b"E", b"N", b"vy"], ("END",))
    assert chunks == [("Hello ", [b"Hello "]), ("ENvy", [b"E", b"N", b"vy"])]
    assert left == []


def test_tokens_of_a_stop_string_are_never_given_to_a_chunk() -> None:
    chunks, left = chunks_with_tokens([b"Hello E", b"N", b"D and more"], ("END",))
    # "Hello E" is cut inside the token: its text goes out, the token with the rest at the end.
    assert chunks == [("Hello ", [])]
    assert left == [b"Hello E", b"N", b"D and more"]


@given(st.text(max_size=60), st.lists(st.integers(min_value=1, max_value=7), max_size=30))
def test_without_stop_strings_every_chunk_carries_exactly_its_own_tokens(text: str, cuts: list[int]) -> None:
    data = text.encode()
    pieces, position = [], 0
    for cut in cuts:
        pieces.append(data[position : position + cut])
        position += cut
    pieces.append(data[position:])
    chunks, left = chunks_with_tokens(pieces)
    for chunk, tokens in chunks:
        assert b"".join(tokens) == chunk.encode()
    assert "".join(chunk for chunk, _ in chunks) == text
    # Only tokens that made no text at all (empty pieces after the last character) are left over.
    assert all(not token for token in left)


@given(st.text(alphabet="ab#é", max_size=40), st.lists(st.integers(min_value=1, max_value=5), max_size=30))
def test_with_a_stop_string_the_given_tokens_are_the_start_of_the_sent_text(text: str, cuts: list[int]) -> None:
    data = text.encode()
    pieces, position = [], 0
    for cut in cuts:
        pieces.append(data[position : position + cut])
        position += cut
    pieces.append(data[position:])
    chunks, _left = chunks_with_tokens(pieces, ("#",))
    sent = "".join(chunk for chunk, _ in chunks).encode()
    given_out = b"".join(token for _, tokens in chunks for token in tokens)
    assert sent.startswith(given_out)
