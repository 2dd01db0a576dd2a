"""Fill the text-encoder output cache for a dataset ahead of training (kohya's tools/cache_text_encoder_outputs.py).

    python tools/cache_text_encoder_outputs.py --pretrained_model_name_or_path MODEL \\
        --dataset_config data.toml [--max_token_length 225] [--clip_skip 2] [--text_encoder_cache_dir DIR]

Takes the training scripts' model and dataset flags (and --config_file, so a training config's model and
dataset keys work), builds the dataset exactly as training does, computes every record's final prompt
(caption/tags merged, prefix/suffix, separators; see ``library.cache.dataset_caching``) and encodes the ones the
cache does not have yet (plus the empty prompt, for caption dropout). Train with the same model, flags and
``--cache_text_encoder_outputs_to_disk`` to use them.

The cache folder: ``--text_encoder_cache_dir``, default ``<first subset's image_dir>/.te_cache`` (beside
its metadata file for a fine-tuning subset without image_dir), the same default training uses. Entries are
keyed by prompt text + tokenizers + max_token_length + clip_skip + a hash of the encoder weights, so a
changed caption or setting is a miss, never a wrong embedding; one folder can serve several models.

Refuses (exit status 2, every reason listed) datasets whose prompts change between draws: shuffle_caption,
token warm-up, tag dropout, caption_tag_mode "random", wildcard choices. Caption dropout is fine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from library.cli.config import build_parser, parse_args, positive_int
from library.cli.data_args import add_dataset_arguments, dataset_flags_from_args
from library.cli.model_args import add_model_arguments
from library.cache.dataset_caching import dataset_prompts, default_text_cache_dir, fill_text_cache
from library.data.cacheable import NotCacheableError, raise_if_not_cacheable
from library.data.dataset_config import DatasetConfigError
from library.data.dataset_config_loading import load_dataset_configs
from library.data.dataset_index import load_dataset_index
from library.data.records import DatasetProblems
from library.models.families import FINEST_BUCKET_STEP, SD2
from library.models.loading import ModelLoadError, load_model
from library.models.text_encoding import PromptEncoder


def build_cache_parser() -> argparse.ArgumentParser:
    """The training scripts' model and dataset flags (and --config_file), plus the encoding batch size."""
    parser = build_parser("Fill the text-encoder output cache of a dataset.", add_model_arguments,
                          add_dataset_arguments)
    group = parser.add_argument_group("text encoder cache")
    group.add_argument("--text_encoder_batch_size", type=positive_int, default=8, help="prompts per encoder batch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the cache holds every prompt of the dataset, 2 on a config/dataset/model problem."""
    parser = build_cache_parser()
    args = parse_args(parser, argv)
    if args.pretrained_model_name_or_path is None:
        parser.error("--pretrained_model_name_or_path is required: the text encoders come from the model")
    try:
        datasets = load_dataset_configs(dataset_flags_from_args(args))
        # Pixels are not read here: header sizes are enough for the records (training verifies the files);
        # buckets do not matter for prompts, so the finest (most permissive) step of any family is used.
        index = load_dataset_index(datasets, min_step=FINEST_BUCKET_STEP, verify_images=False)
        raise_if_not_cacheable(index, cache_latents=False, cache_text=True)  # before the slow model load
    except (DatasetConfigError, DatasetProblems, NotCacheableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    family = args.family or (SD2.cli_name if args.v2 else None)
    try:
        model = load_model(args.pretrained_model_name_or_path, family=family, vae=None)
    except (ModelLoadError, ValueError) as error:
        print(f"model error: {error}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoders = [encoder.to(device).eval() for encoder in model.text_encoders]
    encoder = PromptEncoder(family=model.family.name, tokenizers=model.tokenizers, text_encoders=encoders,
                            max_token_length=args.max_token_length or 75, clip_skip=args.clip_skip)
    cache_dir = Path(args.text_encoder_cache_dir) if args.text_encoder_cache_dir else default_text_cache_dir(datasets)
    cache = fill_text_cache(index, encoder, cache_dir, batch_size=args.text_encoder_batch_size)
    prompts = dataset_prompts(index)
    print(f"{len(index.records)} images, {len(prompts)} distinct prompts; cache {cache.folder} holds "
          f"{len(cache)} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
