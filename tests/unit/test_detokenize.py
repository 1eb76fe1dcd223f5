"""Stop strings and UTF-8 across token boundaries (pure logic)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from innova_smollm.engine.detokenize import TextAssembler


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
