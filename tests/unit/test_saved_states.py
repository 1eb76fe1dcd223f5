"""SavedStates: the byte-budgeted, least-recently-used store of sequence states (pure bookkeeping, no llama.cpp)."""

from __future__ import annotations

from innova_smollm.engine.saved_states import SavedState, SavedStates, common_prefix_length


def _state(*tokens: int, size: int = 10) -> SavedState:
    return SavedState(tuple(tokens), data=object(), size=size)


def test_the_longest_shared_prefix_wins() -> None:
    store = SavedStates(100)
    short, long = _state(1, 2, 9, 9), _state(1, 2, 3, 4, 9)
    store.add(short)
    store.add(long)
    assert store.best_for([1, 2, 3, 4, 5, 6]) == (long, 4)
    assert store.best_for([1, 2, 9, 9, 9]) == (short, 4)
    assert store.best_for([7, 8]) == (None, 0)


def test_the_prompts_last_token_never_counts() -> None:
    store = SavedStates(100)
    state = _state(1, 2, 3)
    store.add(state)
    assert store.best_for([1, 2, 3]) == (state, 2)
    assert store.best_for([1]) == (None, 0)


def test_the_least_recently_used_state_leaves_first_when_the_budget_is_full() -> None:
    store = SavedStates(30)
    first, second, third = _state(1, 1), _state(2, 2), _state(3, 3)
    for state in (first, second, third):
        assert store.add(state)
    store.used(first)
    assert store.add(_state(4, 4))
    assert store.best_for([2, 2, 0])[0] is None, "the least recently used state should have been dropped"
    assert store.best_for([1, 1, 0])[0] is first
    assert (len(store), store.bytes_used) == (3, 30)


def test_a_state_larger_than_the_budget_is_not_kept() -> None:
    store = SavedStates(30)
    kept = _state(1, 1)
    store.add(kept)
    assert not store.add(_state(2, 2, size=31))
    assert (len(store), store.bytes_used) == (1, 10)


def test_a_longer_state_replaces_the_states_it_extends() -> None:
    store = SavedStates(100)
    store.add(_state(1, 2))
    store.add(_state(1, 2, 3))
    other = _state(1, 5)
    store.add(other)
    longest = _state(1, 2, 3, 4)
    store.add(longest)
    assert (len(store), store.bytes_used) == (2, 20)
    assert store.best_for([1, 2, 3, 4, 0]) == (longest, 4)
    assert store.best_for([1, 5, 0]) == (other, 2)


def test_covers_tells_whether_saving_would_add_anything() -> None:
    store = SavedStates(100)
    store.add(_state(1, 2, 3))
    assert store.covers([1, 2]) and store.covers([1, 2, 3])
    assert not store.covers([1, 2, 4]) and not store.covers([1, 2, 3, 4])


def test_a_dropped_state_frees_its_bytes() -> None:
    store = SavedStates(100)
    state = _state(1, 2)
    store.add(state)
    store.drop(state)
    store.drop(state)
    assert (len(store), store.bytes_used, store.best_for([1, 2, 3])) == (0, 0, (None, 0))


def test_common_prefix_length_stops_at_the_limit() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2, 3], [1, 2, 3], 1) == 1
    assert common_prefix_length([1], [1], -1) == 0


def test_a_pinned_state_is_found_like_the_others_and_never_dropped() -> None:
    store = SavedStates(30)
    warm = _state(5, 6, 7, size=10)
    assert store.pin(warm)
    for first in range(10):  # many more states than the budget holds
        assert store.add(_state(first, first, size=10))
    assert store.best_for([5, 6, 7, 8]) == (warm, 3)
    store.drop(warm)  # a state that could not be restored; a pinned one stays
    assert store.best_for([5, 6, 7, 8]) == (warm, 3)
    assert (len(store), store.bytes_used) == (3, 30)


def test_pinned_states_come_out_of_the_budget_first() -> None:
    store = SavedStates(30)
    assert store.add(_state(1, 1, size=10))
    assert store.add(_state(2, 2, size=10))
    assert store.pin(_state(5, 5, size=15))
    # 15 bytes are left for the others: the least recently used one went.
    assert store.limit_bytes == 15
    assert store.best_for([1, 1, 0])[0] is None
    assert store.best_for([2, 2, 0])[0] is not None
    assert not store.add(_state(3, 3, size=16)), "a state larger than what the pinned ones leave cannot be kept"
    assert not store.pin(_state(6, 6, size=16)), "pinned states beyond the whole budget are refused"
    assert store.covers([5])
