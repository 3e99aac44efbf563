"""Rendezvous hashing: every host computes the same home; a member leaving moves only its keys."""

from __future__ import annotations

import collections

from regproxy.rendezvous import order, ranked, score

HOSTS = [f"http://10.0.0.{i}:30003" for i in range(1, 11)]
KEYS = [f"sha256:{i:064x}" for i in range(4000)]


def test_the_order_does_not_depend_on_who_computes_it() -> None:
    for key in KEYS[:50]:
        assert order(HOSTS, key) == order(list(reversed(HOSTS)), key) == order(set(HOSTS), key)


def test_keys_spread_evenly_over_the_members() -> None:
    homes = collections.Counter(order(HOSTS, k)[0] for k in KEYS)
    assert set(homes) == set(HOSTS)
    assert max(homes.values()) < 1.3 * len(KEYS) / len(HOSTS)
    assert min(homes.values()) > 0.7 * len(KEYS) / len(HOSTS)


def test_a_member_leaving_moves_only_its_keys_each_to_its_next() -> None:
    gone = HOSTS[3]
    rest = [h for h in HOSTS if h != gone]
    for key in KEYS:
        before = order(HOSTS, key)
        after = order(rest, key)
        assert after == [h for h in before if h != gone]  # everyone else keeps their place


def test_ranked_orders_objects_by_their_member_names() -> None:
    items = [object() for _ in HOSTS]
    for key in KEYS[:20]:
        got = ranked(items, HOSTS, key)
        assert [HOSTS[items.index(o)] for o in got] == order(HOSTS, key)
    assert score("a", "k") == score("a", "k") != score("b", "k")
