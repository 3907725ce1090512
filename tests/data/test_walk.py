"""data.walk: the one rule set every reader applies, on tiny in-memory shards."""
from __future__ import annotations

import pytest

from kdcache.data import walk
from kdcache.data.corpus import Corpus, CorpusShard
from kdcache.data.walk import (AlignError, BadSample, RawSample, ShardReadError, Skip, align, changed_since_extraction,
                               decode_failures, key_problem, record_to, screen, screened, skip_handler, stored_samples)


def _s(key, error=None):
    return RawSample(key, b"x", None, ("jpg",), error=error)


@pytest.fixture
def memory(monkeypatch):
    """A one-shard corpus whose shard reads as the given raw samples (the walk's reader patched)."""
    def make(items):
        monkeypatch.setattr(walk, "shard_samples", lambda corpus, shard: iter(items))
        return Corpus("mem", "tar", (CorpusShard("s", "mem://s"),))
    return make


@pytest.mark.parametrize("key,bad", [("a/b", False), ("digit/3_0001", False), ("é", False), ("..", True), ("a/../b", True),
                                     ("./a", True), ("/abs", True), ("", True), ("a\nb", True), ("x" * 2000, True)])
def test_key_rules(key, bad):
    assert (key_problem(key) is not None) == bad


def test_screen_keeps_the_first_of_a_duplicate_and_records_the_rest_in_order():
    out = list(screen([_s("a"), _s("b"), _s("a"), _s(".."), _s("c", error="unreadable file"), _s("d")]))
    assert [o.key for o in out if not isinstance(o, Skip)] == ["a", "b", "d"]
    assert [(o.key, o.error) for o in out if isinstance(o, Skip)] == [
        ("a", "duplicate key in shard"), ("..", "sample key with a '.', '..' or leading '/' path segment"),
        ("c", "unreadable file")]


def test_a_broken_tar_ends_the_shard_with_one_record():
    out = list(screen([_s("a"), ShardReadError("t.tar: tar read error"), _s("b")]))
    assert out == [_s("a"), Skip("(tar)", "t.tar: tar read error")]


def test_align_skips_decode_failures_only_so_a_duplicate_key_does_not_hide_its_first_sample(memory):
    corpus = memory([_s("a"), _s("b"), _s("a"), _s("c"), _s("d")])
    failed = [{"key": "a", "error": "duplicate key in shard"}, {"key": "c", "error": "corrupt or truncated image: x"}]
    assert decode_failures(failed) == {"c"}
    assert [(s.row, s.key) for s in align(corpus, corpus.shards[0], ["a", "b", "d"], failed)] == [(0, "a"), (1, "b"), (2, "d")]
    assert [s.key for s in stored_samples(corpus, corpus.shards[0], failed)] == ["a", "b", "d"]


@pytest.mark.parametrize("stored,match", [(["a", "x", "d"], r"corpus key 'b' where the store has 'x' at row 1"),
                                          (["a", "b"], r"corpus key 'd' where the store has '\(end of store shard\)' at row 2"),
                                          (["a", "b", "d", "e"], r"the corpus ended after 3 samples, the store has 4")])
def test_align_names_shard_row_and_key_on_any_mismatch(memory, stored, match):
    corpus = memory([_s("a"), _s("b"), _s("d")])
    with pytest.raises(AlignError, match=match):
        list(align(corpus, corpus.shards[0], stored, []))


def test_error_policy_is_a_function_passed_in():
    got = []
    shard = CorpusShard("s", "mem://s")
    skip_handler("skip", shard, got.append)(Skip("k", "bad"))
    assert got == [Skip("k", "bad")]
    with pytest.raises(BadSample, match=r"mem://s: sample 'k': bad \(--on-error fail\)"):
        skip_handler("fail", shard, got.append)(Skip("k", "bad"))
    with pytest.raises(AlignError, match=r"shard s: sample 'k' was extracted but now fails to decode: bad"):
        changed_since_extraction(shard)(Skip("k", "bad"))


def test_screened_hands_every_skip_to_the_handler_in_order(memory):
    corpus = memory([_s("a"), _s(".."), _s("a"), _s("b")])
    records = []
    assert [s.key for s in screened(corpus, corpus.shards[0], record_to(records))] == ["a", "b"]
    assert records == [{"key": "..", "error": "sample key with a '.', '..' or leading '/' path segment"},
                       {"key": "a", "error": "duplicate key in shard"}]
