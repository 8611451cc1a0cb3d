"""Start-time fair queueing: the tags that order waiters among clients."""

from __future__ import annotations

from app.pipeline.fairness import FairTurns


def _served(turns: FairTurns, waiters: list[tuple[str, str, int]]) -> list[str]:
    """Tag ``(name, client, cost)`` waiters in arrival order and give turns in tag order (the
    oldest first among equals)."""
    tagged = [
        (turns.tag(client, cost), arrival, name)
        for arrival, (name, client, cost) in enumerate(waiters)
    ]
    order = []
    for tag, _, name in sorted(tagged):
        turns.turn(tag)
        order.append(name)
    return order


def test_turns_go_round_robin_among_clients() -> None:
    waiters = [("a1", "a", 1), ("a2", "a", 1), ("a3", "a", 1), ("b1", "b", 1), ("c1", "c", 1)]
    assert _served(FairTurns(), waiters) == ["a1", "b1", "c1", "a2", "a3"]


def test_a_costly_waiter_delays_its_clients_next_by_its_cost() -> None:
    waiters = [("a1", "a", 10), ("a2", "a", 10), ("b1", "b", 1), ("b2", "b", 1), ("b3", "b", 1)]
    # in virtual time b's three end (at 1, 2, 3) before a1 does (at 10)
    assert _served(FairTurns(), waiters) == ["b1", "b2", "b3", "a1", "a2"]


def test_a_large_waiter_is_not_starved_by_a_stream_of_small_ones() -> None:
    turns = FairTurns()
    large = turns.tag("large", 100)
    small = 0
    while True:  # a new small client every time, each served before the large one if it can
        tag = turns.tag(f"small{small}", 1)
        if tag >= large:  # an equal tag goes to the older waiter: the large one
            break
        turns.turn(tag)
        small += 1
    assert small == 99  # then the clock has passed the large one's tag: its turn is next


def test_an_idle_client_gets_no_credit_for_its_idle_time() -> None:
    turns = FairTurns()
    assert _served(turns, [(f"a{i}", "a", 1) for i in range(5)]) == [f"a{i}" for i in range(5)]
    # b was idle while a had five turns: its tag starts from the clock, not from 0, so it does
    # not take five turns in a row ahead of a's next
    later = [("b1", "b", 1), ("b2", "b", 1), ("b3", "b", 1), ("a5", "a", 1)]
    assert _served(turns, later) == ["b1", "a5", "b2", "b3"]


def test_clients_past_the_clock_are_forgotten() -> None:
    turns = FairTurns()
    for client in range(10_000):  # one after another, each served at once
        turns.turn(turns.tag(f"client{client}"))
    assert turns.remembered <= 64
    waiting = [turns.tag(f"waiting{client}") for client in range(500)]
    assert turns.remembered >= 500  # the clients with waiters are remembered
    for tag in waiting:
        turns.turn(tag)
    for client in range(200):
        turns.turn(turns.tag(f"later{client}"))
    assert turns.remembered <= 1000  # dropped again once the table doubled


def test_credit_for_leaving_lasts_one_turn() -> None:
    turns = FairTurns()
    first = turns.tag("b")
    turns.turn(first)
    turns.left("b")
    for other in ("x", "y"):  # two turns given to others before b asks again
        turns.turn(turns.tag(other))
    assert turns.tag("b") == turns.tag("z")  # b starts at the clock, like a newcomer
