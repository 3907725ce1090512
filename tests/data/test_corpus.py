"""data.corpus and the walk's reader: tar grouping that records every member it cannot use; folder shards; read options."""
from __future__ import annotations

import io
import tarfile

import pytest

from kdcache.data.corpus import CorpusError, ReadOptions, resolve_corpus
from kdcache.data.walk import shard_samples
from kdcache.data.corpus import DecodeOptions


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_members_without_a_key_or_repeating_a_field_are_samples_with_an_error(tmp_path):
    _tar(tmp_path / "s.tar", [("a.jpg", b"1"), ("a.cls", b"3"), ("...jpg", b"2"), ("b.jpg", b"3"), ("b.jpg", b"4"),
                              ("../c.jpg", b"5"), ("d.png", b"6")])
    corpus = resolve_corpus(str(tmp_path))
    got = [(s.key, s.data, s.label, s.error) for s in shard_samples(corpus, corpus.shards[0])]
    assert got == [("a", b"1", 3, None), ("..", None, None, "tar member '...jpg' has no sample key"),
                   ("b", b"3", None, "tar member 'b.jpg' repeats field 'jpg' of its sample"),
                   ("../c", b"5", None, None), ("d", b"6", None, None)]


def test_folder_shard_size_and_classes(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            (tmp_path / c / f"{i}.png").write_bytes(b"x")
    corpus = resolve_corpus(str(tmp_path), ReadOptions(folder_shard_size=4))
    assert [s.name for s in corpus.shards] == ["part-000000", "part-000001"]
    assert [len(s.members) for s in corpus.shards] == [4, 2] and corpus.classes == ("cat", "dog")
    assert corpus.describe()["folder_shard_size"] == 4
    assert resolve_corpus(str(tmp_path)).fingerprint() != corpus.fingerprint()


def test_read_options_round_trip_and_legacy_defaults():
    o = ReadOptions(folder_shard_size=4, decode=DecodeOptions(max_pixels=10, min_size=3))
    assert ReadOptions.from_dict(o.to_dict()) == o
    assert ReadOptions.from_dict({"spec": "x", "decode": {"max_pixels": 10, "min_size": 3}}).folder_shard_size == 1000
    with pytest.raises(CorpusError, match="folder-shard-size 0"):
        ReadOptions(folder_shard_size=0)
    with pytest.raises(CorpusError, match="key rules 'other/v9'"):
        ReadOptions.from_dict({"key_rules": "other/v9"})
