"""Text-encoder output cache: fixed-shape shards plus a compact index, constant RAM however large the dataset.

``<directory>/te_<hash of identity>/`` holds ``identity.json`` and shards, each three ``.npy`` files
written once and never modified: ``<shard>.hidden.npy`` (N, L, D), ``<shard>.pooled.npy`` (N, P, SDXL
only) in the storage dtype (float16 by default, or float32), and ``<shard>.keys.npy`` (N, 16) uint8, the
16-byte BLAKE2b digest of identity + caption per row. The keys file is renamed into place last, so its
presence commits the shard (see :class:`TextEncoderOutputCache`).

Deviations from kohya, and why:
    * Text-encoder outputs are keyed by the final caption text + tokenizers + max_token_length + clip_skip +
      encoder weights, not by image file, so an edited caption or a changed setting is a miss, not a
      silently wrong embedding. They are stored as float16 (kohya: float32 per image), sharded, and read
      with ``os.pread`` so nothing is held in RAM but a 24-byte index entry per caption.
    * The distinct prompts are sharded across ranks before checking what is cached
      (``library.data.sharding.rank_share``), so ranks split the work the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from library.cache.latent_files import CacheFileError
from library.data.sharding import rank_share
from library.io import atomic_write_file, read_npy_header
from library.models.text_encoding import EncodedPrompts, PromptEncoder

TE_CACHE_FORMAT = 1


def _hash_hex(data: Iterable[bytes], size: int = 16) -> str:
    h = hashlib.blake2b(digest_size=size)
    for chunk in data:
        h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short hash of what decides token ids: vocabulary/merges/normaliser and the BOS/EOS/PAD ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # runtime state the tokenizer call itself changes
        spec.pop("padding", None)
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                           tokenizer.pad_token_id])
    return _hash_hex([body.encode(), specials.encode()], 8)


def module_fingerprint(module: nn.Module) -> str:
    """Short hash of every parameter and buffer (names, shapes, dtypes, bytes): ~1 s per GB on CPU."""
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def text_encoder_cache_identity(prompt_encoder: PromptEncoder, model_id: str | None = None) -> str:
    """Everything besides the caption that decides an encoding: family, tokenizers, max_token_length,
    clip_skip, and the encoders (``model_id`` if given, e.g. a checkpoint hash, else a hash of the weights)."""
    encoders = model_id if model_id is not None else ",".join(module_fingerprint(m) for m in prompt_encoder.text_encoders)
    tokenizers = ",".join(tokenizer_fingerprint(t) for t in prompt_encoder.tokenizers)
    weighted = ";weighted_captions=1" if prompt_encoder.weighted else ""  # unweighted identities stay as they were
    return (f"family={prompt_encoder.family};max_token_length={prompt_encoder.max_token_length};"
            f"clip_skip={prompt_encoder.clip_skip};tokenizers={tokenizers};encoders={encoders}{weighted}")


@dataclass(frozen=True)
class _Shard:
    name: str
    rows: int
    hidden_offset: int
    pooled_offset: int | None


def _npy_data_offset(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    with open(path, "rb") as f:
        shape, fortran, dtype = read_npy_header(f)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not expected")
        return f.tell(), shape, dtype


class TextEncoderOutputCache:
    """Text-encoder outputs on disk, keyed by caption text under one ``identity``; RAM use ~24 B per caption.

    Layout: ``directory/te_<hash(identity, dtype)>/``; a different identity is a different folder, so it
    simply misses. Entries are written in immutable shards of about ``shard_bytes``; ``add`` buffers rows
    until a shard is full (or ``flush``). The index (opened lazily, rebuilt by ``refresh``) is a sorted
    array of 16-byte digests with parallel int32 shard/row arrays. Reads use ``os.pread`` on files opened
    lazily per process (at most ``max_open_files`` at a time), so page cache is not charged to the process
    and no file handle is ever pickled: the object can be handed to DataLoader workers after ``flush``.

    Multi-rank writing: every writer names its shards with a fresh uuid, so ranks never write the same file;
    an index built after all ranks flushed (e.g. after a barrier, ``refresh()``) merges every shard.

    Storage dtype: float16 by default (half the disk of kohya's float32; bf16 encoder outputs fit fp16's
    range, and numpy has no bf16), or float32 for exact fp32 outputs. ``get`` returns that dtype.
    """

    def __init__(self, directory: str | os.PathLike, identity: str, *, storage_dtype: str = "float16",
                 shard_bytes: int = 256 << 20, max_open_files: int = 32) -> None:
        if storage_dtype not in ("float16", "float32"):
            raise ValueError(f"storage_dtype must be float16 or float32, got {storage_dtype!r}")
        self.identity = identity
        self.storage_dtype = np.dtype(storage_dtype)
        self.shard_bytes = shard_bytes
        self.max_open_files = max_open_files
        tag = _hash_hex([identity.encode("utf-8"), b"\0", storage_dtype.encode()], 8)
        self.folder = Path(directory) / f"te_{tag}"
        self._reset_process_state()
        # Index: sorted segments of (S16 digests, int32 shard ids, int32 rows); None until first needed.
        self._segments: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        self._shards: list[_Shard] = []
        self._shape: tuple[tuple[int, int], int | None] | None = None  # ((L, D), P or None)
        # Write buffer: digest -> row of one preallocated shard-sized array (freed after each flush).
        self._pending: dict[bytes, int] = {}
        self._buffer_hidden: np.ndarray | None = None
        self._buffer_pooled: np.ndarray | None = None

    # -- per-process state (never pickled) ------------------------------------------------------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._files: OrderedDict[str, int] = OrderedDict()

    def __getstate__(self) -> dict:
        if self._pending:
            raise RuntimeError("TextEncoderOutputCache has unflushed entries: call flush() before pickling it")
        state = self.__dict__.copy()
        del state["_files"], state["_pid"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    def _fd(self, path: Path) -> int:
        if self._pid != os.getpid():  # forked: close this process's copies of the parent's descriptors
            for inherited in self._files.values():
                os.close(inherited)
            self._reset_process_state()
        key = str(path)
        fd = self._files.get(key)
        if fd is None:
            fd = os.open(key, os.O_RDONLY)
            self._files[key] = fd
            while len(self._files) > self.max_open_files:
                os.close(self._files.popitem(last=False)[1])
        else:
            self._files.move_to_end(key)
        return fd

    def close(self) -> None:
        """Close the file descriptors this process opened (pending rows are kept; ``flush`` writes them)."""
        if self._pid == os.getpid():
            for fd in self._files.values():
                os.close(fd)
        self._reset_process_state()

    def __enter__(self) -> "TextEncoderOutputCache":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        self.close()

    # -- index -----------------------------------------------------------------------------------------
    def digest(self, prompt: str) -> bytes:
        """The 16-byte key of ``prompt`` under this cache's identity."""
        return hashlib.blake2b(f"{self.identity}\0{prompt}".encode("utf-8"), digest_size=16).digest()

    def refresh(self) -> None:
        """Re-read the shard list (e.g. after other ranks wrote theirs) and rebuild the index."""
        self._shards = []
        self._segments = []
        if self.folder.is_dir():
            for keys_path in sorted(self.folder.glob("*.keys.npy")):
                self._add_shard_to_index(keys_path.name[: -len(".keys.npy")], np.load(keys_path))
        self._merge_segments()

    def _add_shard_to_index(self, name: str, keys: np.ndarray) -> None:
        offset, hidden_shape, dtype = _npy_data_offset(self.folder / f"{name}.hidden.npy")
        pooled_path = self.folder / f"{name}.pooled.npy"
        pooled_offset = pooled_dim = None
        if pooled_path.exists():
            pooled_offset, pooled_shape, _ = _npy_data_offset(pooled_path)
            pooled_dim = pooled_shape[1]
        shape = ((hidden_shape[1], hidden_shape[2]), pooled_dim)
        if dtype != self.storage_dtype or keys.shape != (hidden_shape[0], 16):
            raise ValueError(f"{self.folder / name}: shard does not match this cache ({dtype}, {keys.shape})")
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"{self.folder / name}: entry shape {shape} differs from this cache's {self._shape}")
        self._shape = shape
        shard_id = len(self._shards)
        self._shards.append(_Shard(name, hidden_shape[0], offset, pooled_offset))
        flat = np.ascontiguousarray(keys).view("S16").reshape(-1)
        order = np.argsort(flat, kind="stable")
        self._segments.append((flat[order], np.full(len(flat), shard_id, dtype=np.int32), order.astype(np.int32)))
        if len(self._segments) > 16:
            self._merge_segments()

    def _merge_segments(self) -> None:
        """Fold all index segments into one sorted array (duplicates keep one copy)."""
        if len(self._segments) == 1:
            return
        if not self._segments:
            self._segments = [(np.empty(0, dtype="S16"), np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int32))]
            return
        keys = np.concatenate([s[0] for s in self._segments])
        shard_ids = np.concatenate([s[1] for s in self._segments])
        rows = np.concatenate([s[2] for s in self._segments])
        keys, first = np.unique(keys, return_index=True)
        self._segments = [(keys, shard_ids[first], rows[first])]

    def _ensure_index(self) -> None:
        if self._segments is None:
            self.refresh()

    def _find(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised lookup of S16 digests: (found mask, shard ids, rows); -1 where not found."""
        self._ensure_index()
        found = np.zeros(len(digests), dtype=bool)
        shard_ids = np.full(len(digests), -1, dtype=np.int64)
        rows = np.full(len(digests), -1, dtype=np.int64)
        for keys, seg_shards, seg_rows in self._segments:
            if not len(keys):
                continue
            pos = np.minimum(np.searchsorted(keys, digests), len(keys) - 1)
            hit = (keys[pos] == digests) & ~found
            shard_ids[hit], rows[hit] = seg_shards[pos[hit]], seg_rows[pos[hit]]
            found |= hit
        return found, shard_ids, rows

    def _has(self, digests: list[bytes]) -> np.ndarray:
        if not digests:
            return np.zeros(0, dtype=bool)
        on_disk = self._find(np.array(digests, dtype="S16"))[0]
        return on_disk | np.array([d in self._pending for d in digests], dtype=bool)

    def index_nbytes(self) -> int:
        """Bytes held by the in-RAM index arrays (for the < 1 KB/entry budget)."""
        self._ensure_index()
        return sum(a.nbytes for segment in self._segments for a in segment)

    def __len__(self) -> int:
        self._ensure_index()
        self._merge_segments()
        return len(self._segments[0][0]) + len(self._pending)

    def __contains__(self, prompt: str) -> bool:
        return bool(self._has([self.digest(prompt)])[0])

    def missing(self, prompts: Iterable[str]) -> list[str]:
        """The distinct prompts (in first-seen order) that have no entry yet."""
        distinct = list(dict.fromkeys(prompts))
        present = self._has([self.digest(p) for p in distinct])
        return [p for p, here in zip(distinct, present) if not here]

    # -- writing ---------------------------------------------------------------------------------------
    def add(self, prompts: Sequence[str], encoded: EncodedPrompts) -> None:
        """Store ``encoded`` row b under ``prompts[b]`` (prompts already present are skipped)."""
        dtype = torch.float16 if self.storage_dtype == np.float16 else torch.float32
        hidden = encoded.hidden_states.detach().to("cpu", dtype).numpy()
        pooled = None if encoded.pooled is None else encoded.pooled.detach().to("cpu", dtype).numpy()
        if hidden.ndim != 3 or hidden.shape[0] != len(prompts) or (pooled is not None and pooled.shape[0] != len(prompts)):
            raise ValueError(f"{len(prompts)} prompts but hidden states {hidden.shape}"
                             f"{'' if pooled is None else f' and pooled {pooled.shape}'}")
        self._ensure_index()
        shape = ((hidden.shape[1], hidden.shape[2]), None if pooled is None else pooled.shape[1])
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"entries of shape {shape} do not fit this cache's {self._shape}: "
                             "was max_token_length or the model changed without changing the identity?")
        self._shape = shape
        digests = [self.digest(p) for p in prompts]
        (length, dim), pooled_dim = shape
        row_bytes = (length * dim + (pooled_dim or 0)) * self.storage_dtype.itemsize
        shard_rows = max(1, self.shard_bytes // row_bytes)
        for b, (digest, present) in enumerate(zip(digests, self._has(digests))):
            if present or digest in self._pending:  # also catches a prompt repeated within this call
                continue
            if self._buffer_hidden is None:
                self._buffer_hidden = np.empty((shard_rows, length, dim), self.storage_dtype)
                self._buffer_pooled = None if pooled is None else np.empty((shard_rows, pooled_dim), self.storage_dtype)
            row = len(self._pending)
            self._pending[digest] = row
            self._buffer_hidden[row] = hidden[b]
            if pooled is not None:
                self._buffer_pooled[row] = pooled[b]
            if row + 1 == len(self._buffer_hidden):
                self.flush()

    def flush(self) -> None:
        """Write buffered entries as one new shard (data files first, the keys file last = commit)."""
        if not self._pending:
            return
        try:
            self._write_shard()
        except OSError as error:
            raise CacheFileError(f"{self.folder}: cannot write the text-encoder output cache ({error}); make it "
                                  "writable or pass --text_encoder_cache_dir DIR") from error
        self._pending, self._buffer_hidden, self._buffer_pooled = {}, None, None

    def _write_shard(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "identity.json"
        if not meta.exists():
            text = json.dumps({"identity": self.identity, "storage_dtype": self.storage_dtype.name,
                               "format": TE_CACHE_FORMAT}, indent=1)
            atomic_write_file(meta, lambda handle: handle.write(text.encode()))
        name = f"shard-{uuid.uuid4().hex[:16]}"
        keys = np.frombuffer(b"".join(self._pending), dtype=np.uint8).reshape(-1, 16)
        rows = len(self._pending)
        parts = [(f"{name}.hidden.npy", self._buffer_hidden[:rows])]
        if self._buffer_pooled is not None:
            parts.append((f"{name}.pooled.npy", self._buffer_pooled[:rows]))
        parts.append((f"{name}.keys.npy", keys))
        for part_name, array in parts:  # the keys file lands last: its presence commits the shard
            atomic_write_file(self.folder / part_name, lambda handle: np.save(handle, array))
        self._ensure_index()
        self._add_shard_to_index(name, keys)

    # -- reading ---------------------------------------------------------------------------------------
    def _read(self, path: Path, nbytes: int, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
        buf = bytearray(nbytes)
        got = os.preadv(self._fd(path), [buf], offset)
        if got != nbytes:
            raise OSError(f"{path}: short read ({got} of {nbytes} bytes at {offset})")
        return torch.from_numpy(np.frombuffer(buf, dtype=self.storage_dtype).reshape(shape))

    def get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden_states (L, D), pooled (P,) or None) for ``prompt``; KeyError if it was never added."""
        digest = self.digest(prompt)
        if digest in self._pending:
            i = self._pending[digest]
            pooled = None if self._buffer_pooled is None else torch.from_numpy(self._buffer_pooled[i].copy())
            return torch.from_numpy(self._buffer_hidden[i].copy()), pooled
        found, shard_ids, rows = self._find(np.array([digest], dtype="S16"))
        if not found[0]:
            raise KeyError(f"no cached text-encoder output for caption {prompt!r} in {self.folder}")
        shard, row = self._shards[int(shard_ids[0])], int(rows[0])
        (length, dim), pooled_dim = self._shape
        size = self.storage_dtype.itemsize
        hidden = self._read(self.folder / f"{shard.name}.hidden.npy", length * dim * size,
                            shard.hidden_offset + row * length * dim * size, (length, dim))
        pooled = None
        if pooled_dim is not None:
            pooled = self._read(self.folder / f"{shard.name}.pooled.npy", pooled_dim * size,
                                shard.pooled_offset + row * pooled_dim * size, (pooled_dim,))
        return hidden, pooled

    def get_many(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stacked ``get``: hidden (B, L, D) and pooled (B, P) or None."""
        entries = [self.get(p) for p in prompts]
        hidden = torch.stack([h for h, _ in entries])
        pooled = torch.stack([p for _, p in entries]) if entries and entries[0][1] is not None else None
        return hidden, pooled


def fill_text_encoder_cache(
    prompts: Iterable[str],
    prompt_encoder: PromptEncoder,
    cache: TextEncoderOutputCache,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> int:
    """Encode this rank's share of the distinct prompts (plus "", for caption dropout) that are missing.

    The sorted distinct prompts are split ``[rank::world_size]`` before checking what is cached, so ranks
    that open the cache at different moments still split identically. Each rank writes its own shards;
    after a barrier, ``cache.refresh()`` sees everyone's. Returns how many prompts this rank encoded.
    """
    share = rank_share(sorted(set(prompts) | {""}), rank=rank, world_size=world_size)
    todo = cache.missing(share)
    with torch.no_grad():
        for start in tqdm(range(0, len(todo), batch_size), desc="caching text encoder outputs",
                          disable=not progress or rank != 0):
            batch = todo[start : start + batch_size]
            cache.add(batch, prompt_encoder.encode(batch))
    cache.flush()
    return len(todo)
