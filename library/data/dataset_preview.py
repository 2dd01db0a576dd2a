"""--debug_dataset: a few samples as text (image, bucket, crop, prompt), so a dataset can be checked without a
model. kohya opens an interactive image window instead; a text listing also works over SSH and in logs."""

from __future__ import annotations

import random

from library.data.captions import build_prompt
from library.data.images import face_in_file_name, plan_crop, plan_face_crop
from library.data.records import DatasetIndex

PREVIEW_SAMPLES = 8


def preview_lines(index: DatasetIndex, *, seed: int, count: int = PREVIEW_SAMPLES) -> list[str]:
    """One line per record for the first ``count`` records: path, original size, bucket, resize, crop, flip,
    filter and the prompt of one draw at epoch 1, step 0 (drawn from ``seed``, as a run would vary them)."""
    lines = [f"dataset preview (--debug_dataset): {len(index.records)} image(s); first {min(count, len(index.records))}:"]
    for number, record in enumerate(index.records[:count]):
        rng = random.Random(seed + number)
        subset = record.subset
        prompt = build_prompt(record.caption, record.tags, subset.captions, rng, epoch=1, step=0, max_train_steps=1)
        bucket = record.bucket.bucket if record.bucket is not None else None
        where = f"bucket {bucket[0]}x{bucket[1]}" if bucket else "no bucket"
        face = face_in_file_name(record.image_path) if subset.face_crop_aug_range else None
        if bucket and face is not None and subset.face_crop_aug_range is not None:
            plan = plan_face_crop(record.image_size, bucket, face=face, aug_range=subset.face_crop_aug_range,
                                  random_crop=subset.random_crop, flip_aug=subset.flip_aug, rng=rng,
                                  interpolation=subset.resize_interpolation)
        elif bucket:
            plan = plan_crop(record.image_size, bucket, random_crop=subset.random_crop, flip_aug=subset.flip_aug,
                             rng=rng, interpolation=subset.resize_interpolation)
        if bucket:
            where += (f"{', face crop' if face else ''}, resized to {plan.resized_size[0]}x{plan.resized_size[1]} "
                      f"({subset.resize_interpolation or 'lanczos'}), crop left/top {plan.crop_left_top[0]},"
                      f"{plan.crop_left_top[1]}{', flipped' if plan.flipped else ''}")
        reg = " [reg]" if record.is_reg else ""
        multiplier = index.datasets[record.dataset_index].network_multiplier if index.datasets else 1.0
        if multiplier != 1.0:  # kohya's debug view shows it too
            where += f", network multiplier {multiplier:g}"
        lines.append(f"  {number}: {record.image_path} {record.image_size[0]}x{record.image_size[1]}{reg}, {where}; "
                     f"prompt: {prompt!r}")
    return lines
