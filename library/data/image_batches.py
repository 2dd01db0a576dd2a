"""Images of a folder, decoded and prepared in DataLoader workers and handed over in batches.

Decoding goes through :func:`library.data.images.load_image` (EXIF orientation, transparency on white,
16-bit and other odd modes by their meaning), so a tagger or captioner sees each image as training will.
A model that sees the image small (the tagger: 448 px) says so with ``decode_size``, and a large JPEG is then
decoded reduced (``load_image``'s ``cover_bucket``: 1/2, 1/4 or 1/8 scale, still at least that size), which
halves the decoding cost of a typical photo. An image that cannot be read does not stop the run (one bad file in ten thousand should not): it comes back
as a failure message and the tools report it, as kohya's did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from library.data.buckets import Size
from library.data.images import load_image, read_image_size


@dataclass
class ImageBatch:
    """Images that decoded (with their original (width, height)) and messages for those that did not."""

    paths: list[Path]
    prepared: list[Any]
    sizes: list[tuple[int, int]]
    failures: list[str]


class _PreparedImages(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], prepare: Callable[[Image.Image], Any],
                 decode_size: Callable[[Size], Size] | None) -> None:
        self.paths = list(paths)
        self.prepare = prepare
        self.decode_size = decode_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Path, Any, tuple[int, int] | None, str | None]:
        path = self.paths[index]
        try:
            cover = self.decode_size(read_image_size(path)) if self.decode_size else None
            loaded = load_image(path, cover_bucket=cover)
            return path, self.prepare(loaded.rgb), loaded.full_size or loaded.rgb.size, None
        except Exception as error:  # a broken file must not stop the other workers' images
            return path, None, None, str(error)


def _collate(items: list[tuple[Path, Any, tuple[int, int] | None, str | None]]) -> ImageBatch:
    batch = ImageBatch(paths=[], prepared=[], sizes=[], failures=[])
    for path, prepared, size, failure in items:
        if failure is not None:
            batch.failures.append(failure)
            continue
        batch.paths.append(path)
        batch.prepared.append(prepared)
        batch.sizes.append(size)
    return batch


def image_batches(paths: Sequence[Path], prepare: Callable[[Image.Image], Any], *, batch_size: int,
                  num_workers: int, decode_size: Callable[[Size], Size] | None = None) -> Iterator[ImageBatch]:
    """``prepare(rgb_image)`` runs in the workers (resizing is most of the cost); batches keep file order.
    ``decode_size(full (width, height))``: the smallest size ``prepare`` needs (None: decode in full)."""
    dataset = _PreparedImages(paths, prepare, decode_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_collate, drop_last=False)
    yield from loader
