"""Set-up of a streamed-shard run: its batch control and loader, and the check of what the shards carry against
the loaded model (the parts of the check that need no model ran at config load, in library.data.shard_config)."""

from __future__ import annotations

import logging
from typing import Any

from library.data.dataset_config import DatasetConfigError
from library.data.shard_config import REBUILD, ShardRun
from library.data.shard_plan import plan_layout
from library.data.shard_stream import (SHARD_STREAMS, ShardBatchControl, ShardLoader, ShardStreamDataset,
                                       make_shard_loader)

logger = logging.getLogger(__name__)


def shard_sampler(shards: ShardRun, *, batch_size: int, seed: int, rank: int, world_size: int, batches_per_step: int,
                  num_workers: int) -> ShardBatchControl:
    """This rank's stream control, planned from index.json for ``num_workers`` DataLoader workers."""
    layout = plan_layout(shards.source.units, world_size=world_size, workers=max(1, num_workers),
                         batch_size=batch_size, batches_per_step=batches_per_step)
    logger.info("shards: %d samples in %d shards over %d rank(s) x %d stream(s); %d batches repeated so every rank "
                "runs %d", shards.samples, len(shards.source.units), world_size, layout.workers,
                layout.repeated_batches, layout.batches_per_rank)
    return ShardBatchControl(ShardStreamDataset(shards.source, layout, rank=rank, seed=seed))


def shard_loader(control: ShardBatchControl, *, max_train_steps: int, num_workers: int,
                 persistent_workers: bool = False) -> ShardLoader:
    """The loader of the stream; the workers count was fixed by the plan (``shard_sampler``)."""
    control.dataset.max_train_steps = max_train_steps
    return make_shard_loader(control.dataset, control, num_workers=max(0, num_workers),
                             persistent_workers=persistent_workers)


def check_shard_tensors(shards: ShardRun, *, model: Any, prompt_encoder: Any, latent_mode: str | None) -> None:
    """Refuse latents / text-encoder outputs in the shards that this model did not make (one line)."""
    from library.cache.text_encoder_files import module_fingerprint, text_encoder_cache_identity
    from library.data.shard_format import provenance_mismatches

    source = shards.source
    if source.use_latents:
        expected = {"family": model.family.name, "vae": module_fingerprint(model.vae),
                    "latent_channels": int(model.vae.config.latent_channels)}
        for subset, recorded in zip(source.subsets, shards.latent_provenance):
            differences = provenance_mismatches(recorded, expected)
            if differences:
                raise DatasetConfigError(f"{subset.source}: the latents in the shards were made by another VAE or "
                                         f"model ({'; '.join(differences)}): rebuild the shards with {REBUILD} "
                                         "and this run's model, --mixed_precision and --no_half_vae (the "
                                         "fingerprint is of the weights as this run casts them)")
    elif latent_mode is not None:
        logger.warning("the shards carry no latents: every step encodes its images (write the shards with cached "
                       "latents to skip the VAE)")
    if source.use_text:
        identity = text_encoder_cache_identity(prompt_encoder)
        for subset, recorded in zip(source.subsets, shards.text_provenance):
            differences = provenance_mismatches(recorded, {"identity": identity})
            if differences:
                raise DatasetConfigError(f"{subset.source}: the text-encoder outputs in the shards were made by "
                                         "other text encoders or settings (max_token_length, clip_skip, "
                                         f"tokenizers): rebuild the shards with {REBUILD} and this run's model")


def check_shard_resume(shards: ShardRun | None, state: Any, *, worker_streams: int) -> None:
    """A streamed run continues its exact sample order only on the process count and the worker streams per
    process it was saved with: each stream reads its own shards, so another count deals them differently
    (StateError, one line)."""
    from library.training.checkpoints import StateError
    from library.training.process_count import SAVED_PROCESSES

    extra = getattr(state, "extra", None) or {}
    saved = extra.get(SAVED_PROCESSES)
    if shards is not None and saved is not None and int(saved) != int(state.num_processes):
        raise StateError(f"this state was saved by {saved} process(es); a run that streams shards resumes only on "
                         f"the same count, since each process reads its own shards: launch it with "
                         f"--num_processes {saved}")
    streams = extra.get(SHARD_STREAMS)
    if shards is not None and streams is not None and int(streams) != worker_streams:
        raise StateError(f"this state was saved reading the shards in {streams} worker stream(s) per process and this "
                         f"run has {worker_streams}: the sample order would differ; resume "
                         f"with --max_data_loader_n_workers {streams} (0 and 1 both read one stream) on a machine "
                         "with at least that many CPUs")
