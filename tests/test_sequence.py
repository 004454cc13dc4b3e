"""Sequence: incremental UTF-8, stop strings, EOG, max_tokens and external finishes (pure)."""

from __future__ import annotations

import pytest

from wicore_cpp.engine.messages import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerateRequest,
    SamplingParams,
)
from wicore_cpp.engine.sequence import Sequence

EOG = 2  # the model's end-of-generation token id in these tests


def make_seq(max_tokens: int = 100, stop: tuple[str, ...] = (), prompt=(1, 5, 7)) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, stop=stop)
    return Sequence(GenerateRequest("req_t", list(prompt), params), slot=0, sampler=None,
                    reservation=len(prompt) + max_tokens)


def feed(seq: Sequence, pieces: list[bytes | str], first_token: int = 100) -> list[tuple]:
    """Accept one token per piece, taking an update after each as the batcher does."""
    updates = []
    for i, piece in enumerate(pieces):
        data = piece.encode() if isinstance(piece, str) else piece
        seq.accept(first_token + i, data, is_eog=False)
        update = seq.take_update()
        assert update is not None  # every accepted token is reported
        updates.append(update)
    return updates


def eog(seq: Sequence) -> tuple:
    seq.accept(EOG, b"", is_eog=True)
    update = seq.take_update()
    assert update is not None
    return update


def texts(updates: list[tuple]) -> list[str]:
    return [u[2] for u in updates]


def test_initial_state():
    seq = make_seq(prompt=(1, 2, 3, 4))
    assert seq.request_id == "req_t"
    assert seq.slot == 0
    assert seq.is_prefilling
    assert seq.num_generated == 0
    assert seq.finish_reason is None
    assert seq.take_update() is None
    seq.n_cached = 4
    assert not seq.is_prefilling


def test_plain_text_is_emitted_immediately_without_stops():
    seq = make_seq()
    updates = feed(seq, ["Hel", "lo", " world"])
    assert texts(updates) == ["Hel", "lo", " world"]
    assert [u[3] for u in updates] == [[100], [101], [102]]
    assert all(u[0] == "req_t" and u[4] is None and u[5] is None for u in updates)
    assert seq.num_generated == 3


def test_take_update_none_when_nothing_new():
    seq = make_seq()
    assert seq.take_update() is None
    feed(seq, ["a"])
    assert seq.take_update() is None
    assert seq.take_update() is None


# -- UTF-8 across pieces ---------------------------------------------------------------------

LIANG = "量".encode()  # 3 bytes
EMOJI = "😀".encode()  # 4 bytes


@pytest.mark.parametrize(
    "pieces, full",
    [
        ([b"a", LIANG[:1], LIANG[1:], b"b"], "a量b"),
        ([LIANG[:1], LIANG[1:2], LIANG[2:]], "量"),
        ([b"x", EMOJI[:2], EMOJI[2:]], "x😀"),
        ([EMOJI[:1], EMOJI[1:3], EMOJI[3:] + LIANG[:2], LIANG[2:] + b"!"], "😀量!"),
        (["量子".encode()[:4], "量子".encode()[4:]], "量子"),
    ],
)
@pytest.mark.parametrize("stop", [(), ("ZZZ",)])
def test_split_utf8_is_never_emitted_partially(pieces, full, stop):
    seq = make_seq(stop=stop)
    updates = feed(seq, pieces)
    updates.append(eog(seq))
    emitted = texts(updates)
    assert all("\ufffd" not in t for t in emitted), emitted
    assert "".join(emitted) == full
    # Each token id is reported once, even for pieces that produced no text yet.
    assert [tid for u in updates for tid in u[3]] == [100 + i for i in range(len(pieces))]


def test_partial_character_piece_reports_token_with_empty_text():
    seq = make_seq()
    (update,) = feed(seq, [EMOJI[:2]])
    assert update[2] == ""
    assert update[3] == [100]
    (update,) = feed(seq, [EMOJI[2:]], first_token=101)
    assert update[2] == "😀"


# -- stop strings ----------------------------------------------------------------------------


def test_stop_spanning_pieces_is_never_emitted():
    seq = make_seq(stop=("END",))
    updates = feed(seq, ["xx E", "N", "D yy"])
    emitted = texts(updates)
    assert "".join(emitted) == "xx "
    assert not any(ch in t for t in emitted for ch in "END")
    assert updates[-1][4] == FINISH_STOP
    assert seq.finish_reason == FINISH_STOP
    assert seq.error is None


def test_stop_holds_back_only_what_could_begin_a_stop():
    seq = make_seq(stop=("END",))
    (update,) = feed(seq, ["hello world"])
    # No tail of "hello world" begins "END": nothing is held back.
    assert update[2] == "hello world"
    (update,) = feed(seq, ["and E"], first_token=101)
    assert update[2] == "and "  # "E" could begin "END"
    (update,) = feed(seq, ["N"], first_token=102)
    assert update[2] == ""  # "EN" still could
    assert eog(seq)[2] == "EN"


def test_held_text_released_when_it_cannot_complete_a_stop():
    seq = make_seq(stop=("END",))
    updates = feed(seq, ["E", "N", "X", "yz"])
    # "EN" could begin "END" but "ENX" cannot: all of it is released at once.
    assert "".join(texts(updates)) == "ENXyz"
    assert seq.finish_reason is None
    assert eog(seq)[2] == ""  # nothing was held back


def test_stop_in_the_middle_of_one_piece_drops_the_rest():
    seq = make_seq(stop=("END",))
    updates = feed(seq, ["abc END def"])
    assert texts(updates) == ["abc "]
    assert updates[0][4] == FINISH_STOP


def test_stop_at_very_start():
    seq = make_seq(stop=("<|x|>",))
    updates = feed(seq, ["<|", "x|", ">tail"])
    assert "".join(texts(updates)) == ""
    assert updates[-1][4] == FINISH_STOP


def test_multiple_stops_earliest_match_wins():
    seq = make_seq(stop=("STOP", "!"))
    updates = feed(seq, ["Hi! STOP"])
    assert "".join(texts(updates)) == "Hi"
    assert seq.finish_reason == FINISH_STOP


def test_multiple_stops_longer_one_starting_earlier_wins():
    seq = make_seq(stop=("op", "longstop"))
    updates = feed(seq, ["a lo", "ngst", "op and more"])
    assert "".join(texts(updates)) == "a "
    assert seq.finish_reason == FINISH_STOP


def test_multiple_stops_shorter_one_completing_first_wins():
    seq = make_seq(stop=("ABCD", "BC"))
    updates = feed(seq, list("xABCD"))
    assert "".join(texts(updates)) == "xA"
    assert seq.finish_reason == FINISH_STOP
    # Finished at the token that completed "BC": the later "D" produced nothing.
    assert updates[3][4] == FINISH_STOP


def test_stop_with_multibyte_characters_split_across_pieces():
    seq = make_seq(stop=("量子",))
    data = "前量子后".encode()
    updates = feed(seq, [data[:4], data[4:7], data[7:]])
    assert "".join(texts(updates)) == "前"
    assert seq.finish_reason == FINISH_STOP


def test_stop_wins_over_length_on_the_same_token():
    seq = make_seq(max_tokens=2, stop=("END",))
    updates = feed(seq, ["aE", "ND"])
    assert "".join(texts(updates)) == "a"
    assert seq.finish_reason == FINISH_STOP
    assert seq.num_generated == 2


# -- EOG, max_tokens, external finish --------------------------------------------------------


def test_eog_finishes_with_stop_and_flushes_held_text():
    seq = make_seq(stop=("<end_of_turn>",))
    updates = feed(seq, ["The answer", " is 4 <end"])
    assert "".join(texts(updates)) == "The answer is 4 "  # "<end" is held back
    final = eog(seq)
    assert final[4] == FINISH_STOP
    assert final[3] == []  # the EOG token itself is not output
    assert "".join(texts(updates)) + final[2] == "The answer is 4 <end"
    assert seq.num_generated == 2
    assert seq.last_token == EOG


def test_eog_without_stops():
    seq = make_seq()
    feed(seq, ["a"])
    assert eog(seq) == ("req_t", 0, "", [], FINISH_STOP, None, None)


def test_max_tokens_finishes_with_length_and_flushes():
    seq = make_seq(max_tokens=3, stop=("NEVER",))
    updates = feed(seq, ["one", " two", " three"])
    assert [u[4] for u in updates] == [None, None, FINISH_LENGTH]
    assert "".join(texts(updates)) == "one two three"
    assert seq.num_generated == 3
    assert [tid for u in updates for tid in u[3]] == [100, 101, 102]


def test_max_tokens_one():
    seq = make_seq(max_tokens=1)
    (update,) = feed(seq, ["x"])
    assert update == ("req_t", 0, "x", [100], FINISH_LENGTH, None, None)


@pytest.mark.parametrize("reason, error", [(FINISH_CANCELLED, None),
                                           (FINISH_ERROR, "the KV cache is full")])
def test_finish_from_outside(reason, error):
    seq = make_seq()
    feed(seq, ["partial"])
    seq.finish(reason, error)
    assert seq.take_update() == ("req_t", 0, "", [], reason, error, None)
    # A second finish does not overwrite the first.
    seq.finish(FINISH_ERROR, "later")
    assert (seq.finish_reason, seq.error) == (reason, error)


def test_finish_from_outside_does_not_overwrite_natural_finish():
    seq = make_seq(max_tokens=1)
    feed(seq, ["x"])
    seq.finish(FINISH_CANCELLED)
    assert seq.finish_reason == FINISH_LENGTH
    assert seq.error is None
