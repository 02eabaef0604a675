"""Token shard files: the two on-disk formats, validation, and a view that joins shards without reading them.

Format (a), nanoGPT's ``prepare.py``: raw little-endian uint16 token ids, nothing else.
Format (b), llm.c's ``fineweb.py``: 256 little-endian int32 header words, ``[0] == 20240520`` (magic),
``[1] == 1`` (version: uint16 tokens), ``[2]`` == number of tokens; then the tokens as in (a).
A shard is (b) when its first word is the magic; the version and the size are then checked too.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_BYTES = 256 * 4
HOW_TO_MAKE = ("make uint16 *.bin token shards with nanoGPT's prepare.py, llm.c's fineweb.py or "
               "ddl.data.write_shard, and put 'val' in the validation shard's name")


class DataError(Exception):
    """User-facing data problem; ``str(e)`` is one line that says what is wrong and what to do.

    Defined here so that this module and ``ddl.data`` raise one class; import it from ``ddl.data``.
    """

    __module__ = "ddl.data"


class ShardedTokens:
    """Several shards read as one uint16 token stream, with nothing loaded until it is sliced.

    Quacks like the 1-D array ``get_batch`` needs: ``len``, ``shape``, ``dtype`` and ``[i]`` /
    ``[start:stop]``. A slice across a shard boundary joins the two pieces (documents in such shards end
    with an end-of-text token, so a window across files is no stranger than one across documents).
    ``np.asarray`` reads every shard into memory: avoid it on large sets.
    """

    dtype = np.dtype(np.uint16)
    ndim = 1

    def __init__(self, parts: list[np.ndarray], label: str):
        self.parts = parts
        self.label = label
        self.ends = np.cumsum([len(p) for p in parts])  # self.ends[i]: one past part i's last token

    def __len__(self) -> int:
        return int(self.ends[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("ShardedTokens supports contiguous slices only")
            return self._range(start, max(start, stop))
        i = int(key)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {key} out of range for {len(self)} tokens")
        return self._range(i, i + 1)[0]

    def _range(self, start: int, stop: int) -> np.ndarray:
        out = []
        part = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            begin = int(self.ends[part - 1]) if part else 0
            take = min(stop, int(self.ends[part])) - start
            out.append(self.parts[part][start - begin:start - begin + take])
            start += take
            part += 1
        if len(out) == 1:
            return np.asarray(out[0])
        return np.concatenate(out) if out else np.zeros(0, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.parts)
        return whole if dtype is None else whole.astype(dtype)

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self)} tokens in {len(self.parts)} shards)"


TokenArray = np.ndarray | ShardedTokens


def find_shards(pattern: str) -> tuple[list[Path], list[Path]]:
    """(train, val) shard paths for a directory (its ``*.bin``) or a glob; 'val' in a name means val."""
    where = Path(pattern).expanduser()
    if where.is_dir():
        paths = sorted(p for p in where.glob("*.bin") if p.is_file())
    else:
        paths = sorted(Path(p) for p in glob.glob(str(where), recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"no token shards match {pattern!r}; {HOW_TO_MAKE}")
    val = [p for p in paths if "val" in p.name]
    train = [p for p in paths if "val" not in p.name]
    if not val:
        raise DataError(f"none of the {len(paths)} shards matching {pattern!r} is a validation shard; "
                        f"name one of them *val*.bin (e.g. fineweb_val_000000.bin)")
    if not train:
        raise DataError(f"all {len(paths)} shards matching {pattern!r} have 'val' in their names; add "
                        f"training shards whose names do not contain 'val'")
    return train, val


def read_shard(path: Path) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memory map, after checking its size and header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4") if size >= HEADER_BYTES else None
    if head is not None and head[0] == MAGIC:
        if head[1] != VERSION:
            raise DataError(f"{path}: llm.c shard version {head[1]} is not supported (only version 1, uint16 "
                            f"tokens); re-export it with uint16 tokens")
        n = int(head[2])
        if n < 0 or size != HEADER_BYTES + 2 * n:
            raise DataError(f"{path}: the llm.c header says {n} tokens ({HEADER_BYTES + 2 * n} bytes) but "
                            f"the file has {size} bytes; the shard is truncated or damaged, write it again")
        offset = HEADER_BYTES
    else:
        if size % 2:
            raise DataError(f"{path}: {size} bytes is odd, so not whole uint16 tokens; the shard is "
                            f"truncated or not a token file, write it again")
        n, offset = size // 2, 0
    if n == 0:
        raise DataError(f"{path}: the shard holds no tokens; delete it or write it again")
    return np.memmap(path, dtype="<u2", mode="r", offset=offset, shape=(n,))


def check_vocab(path: Path, tokens: np.ndarray, vocab_size: int | None) -> int:
    """The shard's largest id + 1, after checking it against ``vocab_size`` when one is declared.

    Reads the whole shard once (disk speed, in 64M-token pieces so the page cache can let go).
    """
    top = max(int(tokens[i:i + (1 << 26)].max()) for i in range(0, len(tokens), 1 << 26))
    if vocab_size is not None and top >= vocab_size:
        raise DataError(f"{path}: token id {top} >= vocab_size {vocab_size}; pass the vocab size of the "
                        f"tokenizer that made the shards")
    return top + 1


def write_shard(path: Path, tokens: np.ndarray, header: bool = True) -> None:
    """Write ``tokens`` as an llm.c shard (``header=True``) or as raw uint16 (nanoGPT); atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
    if len(tokens) and (tokens.min() < 0 or tokens.max() > 0xFFFF):
        raise ValueError(f"token ids must lie in [0, 65535] for uint16 shards, got [{tokens.min()}, "
                         f"{tokens.max()}]")
    if header and len(tokens) > np.iinfo(np.int32).max:
        raise ValueError(f"{len(tokens)} tokens do not fit an llm.c header's int32 count; split the shard")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if header:
                head = np.zeros(256, dtype="<i4")
                head[:3] = MAGIC, VERSION, len(tokens)
                f.write(head.tobytes())
            f.write(tokens.astype("<u2").tobytes())
        os.replace(tmp, path)  # readers never see a shard shorter than its header says
    finally:
        tmp.unlink(missing_ok=True)
