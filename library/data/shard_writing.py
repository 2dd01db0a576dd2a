"""Write samples of ``library.data.shard_format`` into size-limited webdataset shards plus ``index.json``.

webdataset's own ``ShardWriter`` writes the tar files (``shard-000000.tar``, ...). Its ``maxsize`` is checked
before a sample on the bytes of the samples already written, so a shard may grow past it by one sample; here
the exact tar size of the next sample (512-byte headers, padding, the end-of-archive blocks and the 10 KiB
record rounding) is computed first and a new shard is started when it would not fit, so every file is at
most the limit. All files are written into a hidden temporary folder inside the output folder and renamed
into place at :meth:`ShardSetWriter.commit`, ``index.json`` last: a reader never sees a half-written set.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tarfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from library.data.buckets import Size
from library.data.shard_format import (
    INDEX_NAME,
    SHARD_PATTERN,
    BucketSettings,
    ShardEntry,
    ShardIndex,
    bucket_name,
    write_index,
)

WEBDATASET_VERSION = "1.0.2"
TAR_BLOCK = 512
TAR_RECORD = 10240  # tarfile pads the archive to a multiple of this
TAR_END = 2 * TAR_BLOCK  # the end-of-archive marker
TEMP_PREFIX = ".shards-tmp-"
TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member
TAR_MODE = 0o444
TAR_USER = "bigdata"  # webdataset's default user and group


class ShardWriteError(ValueError):
    """A sample that can never fit the shard size, a name tar cannot hold, or a missing webdataset."""


def require_webdataset() -> Any:
    """The webdataset module, or :class:`ShardWriteError` with the install line."""
    try:
        import webdataset
    except ImportError:
        raise ShardWriteError(f"streamed shards need the webdataset package: pip install "
                              f"webdataset=={WEBDATASET_VERSION}") from None
    return webdataset


def tar_member_bytes(size: int, name: str = "s000000000.json") -> int:
    """Bytes one member of ``size`` bytes named ``name`` takes in a shard: its header as TarWriter writes it
    (tarfile's default PAX format; no extended header for these short ASCII names and the integer mtime)
    and the data padded to whole blocks."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = int(size), TAR_MTIME, TAR_MODE, TAR_USER, TAR_USER
    return len(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")) + -(-int(size) // TAR_BLOCK) * TAR_BLOCK


def tar_file_bytes(members_bytes: int) -> int:
    """Size of a tar file whose members take ``members_bytes``: end marker, then rounded up to a record."""
    return -(-(members_bytes + TAR_END) // TAR_RECORD) * TAR_RECORD


def sample_tar_bytes(sample: Mapping[str, Any]) -> int:
    """What ``sample`` (``encode_sample``'s dict) adds to a shard."""
    key = sample["__key__"]
    return sum(tar_member_bytes(len(value), f"{key}.{name}") for name, value in sample.items()
               if not name.startswith("_"))


def existing_shard_files(directory: str | os.PathLike) -> list[Path]:
    """The shard files and index.json already in ``directory`` (sorted)."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = sorted(folder.glob("shard-*.tar"))
    if (folder / INDEX_NAME).exists():
        found.append(folder / INDEX_NAME)
    return found


class ShardSetWriter:
    """``write(sample, bucket)`` each sample, then ``commit(...)`` -> the written :class:`ShardIndex`; used as a
    context manager, an exception leaves the output folder as it was (the temporary folder is removed).

    ``max_bytes``: the largest shard file; ``overwrite``: replace the shards and index.json already there
    (other files are kept); without it an output folder holding shards is a :class:`ShardWriteError`.
    """

    def __init__(self, output_dir: str | os.PathLike, *, max_bytes: int, bucket_settings: BucketSettings,
                 overwrite: bool = False) -> None:
        webdataset = require_webdataset()
        self.output_dir = Path(output_dir)
        self.max_bytes = int(max_bytes)
        if self.max_bytes < TAR_RECORD:
            raise ShardWriteError(f"a shard size of {self.max_bytes} bytes is less than one tar record "
                                  f"({TAR_RECORD} bytes)")
        if existing_shard_files(self.output_dir) and not overwrite:
            raise ShardWriteError(f"{self.output_dir} already holds shards; pass --overwrite to replace them, or "
                                  "choose another folder")
        self.bucket_settings = bucket_settings
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir = self.output_dir / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.temp_dir.mkdir()
        self._writer = webdataset.ShardWriter(str(self.temp_dir / SHARD_PATTERN), maxsize=self.max_bytes,
                                              maxcount=1 << 62, verbose=0, encoder=False, mtime=TAR_MTIME,
                                              mode=TAR_MODE, user=TAR_USER, group=TAR_USER)
        self._shard_members = 0  # member bytes in the open shard
        self._counts: list[Counter[str]] = []

    def write(self, sample: Mapping[str, Any], bucket: Size) -> None:
        """Add one sample (``shard_format.encode_sample``'s dict) to the open shard, or to a new one."""
        size = sample_tar_bytes(sample)
        if tar_file_bytes(size) > self.max_bytes:
            raise ShardWriteError(f"sample {sample['__key__']} takes {tar_file_bytes(size)} bytes in a tar, more "
                                  f"than the shard size of {self.max_bytes} bytes; raise the shard size")
        if not self._counts:  # the ShardWriter opened shard 0 when it was made
            self._counts.append(Counter())
        elif tar_file_bytes(self._shard_members + size) > self.max_bytes:
            self._writer.next_stream()  # webdataset's own rollover, started before the shard would overflow
            self._counts.append(Counter())
            self._shard_members = 0
        self._writer.write(dict(sample))
        self._shard_members += size
        written = self._writer.tarstream.tarstream.offset
        if written != self._shard_members:  # the size rule relies on this prediction: never let it drift
            raise ShardWriteError(f"sample {sample['__key__']}: the shard holds {written} bytes, {self._shard_members} "
                                  "were predicted; report this as a bug")
        self._counts[-1][bucket_name(bucket)] += 1

    def commit(self, *, latents: dict[str, Any] | None = None,
               text_encoder_outputs: dict[str, Any] | None = None) -> ShardIndex:
        """Close the last shard, move the shards into the output folder (replacing an old set) and write
        index.json last; returns the index."""
        self._writer.close()
        entries = []
        for number, counts in enumerate(self._counts):
            name = SHARD_PATTERN % number
            entries.append(ShardEntry(name=name, samples=sum(counts.values()),
                                      bytes=(self.temp_dir / name).stat().st_size,
                                      buckets=dict(sorted(counts.items()))))
        total: Counter[str] = Counter()
        for counts in self._counts:
            total.update(counts)
        index = ShardIndex(samples=sum(total.values()), buckets=dict(sorted(total.items())),
                           bucket_settings=self.bucket_settings, shards=tuple(entries), latents=latents,
                           text_encoder_outputs=text_encoder_outputs)
        old = existing_shard_files(self.output_dir)
        (self.output_dir / INDEX_NAME).unlink(missing_ok=True)  # no index while the set is being replaced
        names = {entry.name for entry in entries}
        for entry in entries:
            os.replace(self.temp_dir / entry.name, self.output_dir / entry.name)
        for path in old:
            if path.name not in names and path.name != INDEX_NAME:
                path.unlink(missing_ok=True)
        write_index(index, self.output_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return index

    def abort(self) -> None:
        """Drop everything written so far; the output folder keeps what it had."""
        try:
            self._writer.close()
        except Exception:  # a half-open tar is being thrown away anyway
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None or self.temp_dir.exists():
            self.abort()
