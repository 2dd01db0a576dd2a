"""Where the images come from and how they are batched, captioned, cached and conditioned (ControlNet)."""

from __future__ import annotations

import argparse
import os

from library.cli.config import add_validator, non_negative_int
from library.cache.dataset_caching import CacheMode
from library.data.captions import CAPTION_TAG_MODES
from library.data.dataset_config_chain import CLI_NAMES, DATASET_KEYS, SUBSET_KEYS
from library.data.dataset_config import parse_face_crop_range
from library.data.dataset_config_loading import DatasetFlags
from library.data.conditioning import FILTERS, ConditioningFilter, make_filter
from library.data.images import RESIZE_FILTERS


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the images come from and how they are batched and augmented (the basic kohya flags)."""
    group = parser.add_argument_group("dataset")
    group.add_argument("--train_data_dir", type=str, default=None,
                       help="folder of training images (DreamBooth '<repeats>_<name>' subfolders or a fine-tune folder)")
    group.add_argument("--reg_data_dir", type=str, default=None, help="folder of regularisation images")
    group.add_argument("--in_json", type=str, default=None, help="metadata JSON for fine-tuning datasets")
    group.add_argument("--dataset_config", type=str, default=None,
                       help="dataset config TOML ([general]/[[datasets]]/[[datasets.subsets]])")
    group.add_argument("--resolution", type=str, default=None,
                       help="training resolution: 'SIZE' or 'WIDTH,HEIGHT', e.g. 512 or 512,768")
    group.add_argument("--train_batch_size", type=int, default=1, help="batch size per device")
    group.add_argument("--caption_extension", type=str, default=".caption", help="extension of caption files")
    group.add_argument("--caption_extention", type=str, default=None,
                       help="kohya's old spelling of --caption_extension; when given, it wins (as in kohya)")
    group.add_argument("--resize_interpolation", type=str, choices=tuple(RESIZE_FILTERS), default=None,
                       help="filter that resizes images into their bucket (and for the latent cache); default: "
                            "lanczos both ways (kohya: area when shrinking, lanczos when enlarging); area and box "
                            "are PIL's pixel-area average")
    group.add_argument("--face_crop_aug_range", type=_face_crop_range, default=None, metavar="MIN,MAX",
                       help="kohya's face crop, e.g. 2.0,4.0: for an image named <name>_<cx>_<cy>_<w>_<h>.png "
                            "(face centre and size in pixels), scale it so the face's longer side is 1/MAX to "
                            "1/MIN of the short training side and crop around the face; without --enable_bucket "
                            "only, and not in the latent cache (both as in kohya)")
    group.add_argument("--cache_info", action="store_true",
                       help="accepted for kohya configs; does nothing here: kohya writes metadata_cache.json to "
                            "skip re-reading image sizes, while start-up here reads only image headers, which is "
                            "already fast (--cache_latents_to_disk caches the latents)")
    group.add_argument("--debug_dataset", action="store_true",
                       help="print the first samples' captions, buckets and crops, then exit without loading a "
                            "model (kohya opens an interactive image viewer instead)")
    group.add_argument("--enable_bucket", action="store_true", help="aspect-ratio bucketing")
    group.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    group.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    group.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    add_validator(parser, _check_bucket_reso_steps)
    group.add_argument("--bucket_no_upscale", action="store_true", help="never upscale an image to fit a bucket")
    group.add_argument("--shuffle_caption", action="store_true", help="shuffle the separated caption tokens")
    group.add_argument("--keep_tokens", type=int, default=0,
                       help="keep the first N caption tokens in place when shuffling")
    group.add_argument("--caption_separator", type=str, default=",", help="separator of caption tokens")
    group.add_argument("--flip_aug", action="store_true", help="random horizontal flips")
    group.add_argument("--color_aug", action="store_true", help="random hue shifts (disables latent caching)")
    group.add_argument("--random_crop", action="store_true", help="random instead of centre crops")
    group.add_argument("--dataset_repeats", type=int, default=1,
                       help="repeats per epoch of a subset that sets no num_repeats (fine-tune datasets)")
    group.add_argument("--keep_tokens_separator", type=str, default="",
                       help="marker splitting a caption into fixed head / shuffled middle / fixed tail, e.g. '|||'")
    group.add_argument("--secondary_separator", type=str, default=None,
                       help="separator that joins tokens into one unit when shuffling; replaced by "
                            "--caption_separator afterwards, e.g. ';;;'")
    group.add_argument("--weighted_captions", action="store_true",
                       help="A1111 emphasis in captions: (word) x1.1, [word] /1.1, (word:1.3), \\( for a literal "
                            "bracket; each token's text-encoder state is scaled by its weight, as in kohya. "
                            "Shuffling and dropout split captions at commas, so keep commas out of brackets")
    group.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    group.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    group.add_argument("--enable_wildcard", action="store_true",
                       help="'{a|b|c}' picks one choice; a multi-line caption picks one random line")
    group.add_argument("--caption_dropout_rate", type=float, default=0.0,
                       help="probability of training a sample with an empty caption")
    group.add_argument("--caption_dropout_every_n_epochs", type=int, default=0,
                       help="train with empty captions every N-th epoch (0: off)")
    group.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                       help="probability of dropping each shuffled caption token")
    group.add_argument("--token_warmup_min", type=int, default=1,
                       help="caption tokens kept at step 0 of token warm-up")
    group.add_argument("--token_warmup_step", type=float, default=0,
                       help="token warm-up length: steps (>= 1) or a fraction of the training steps (< 1); 0: off")
    group.add_argument("--caption_tag_mode", type=str, choices=CAPTION_TAG_MODES, default="concat",
                       help="how a metadata caption and its tags are combined")
    group.add_argument("--alpha_mask", action="store_true",
                       help="use the image's alpha channel as the loss mask")
    group.add_argument("--conditioning_data_dir", type=str, default=None,
                       help="ControlNet conditioning images (same file names as the --train_data_dir images)")
    group.add_argument("--prior_loss_weight", type=float, default=1.0,
                       help="loss weight of regularisation images")
    group.add_argument("--validation_split", type=float, default=0.0,
                       help="fraction of each dataset held out for validation (0: none; 1: validate on every image, "
                            "which then also trains, where kohya would be left with no training images)")
    group.add_argument("--validation_seed", type=int, default=None,
                       help="seed of the validation split shuffle; default: the training --seed")
    group.add_argument("--max_data_loader_n_workers", type=int, default=8,
                       help="data loader worker processes; capped at the CPU count, as in kohya")
    group.add_argument("--persistent_data_loader_workers", action="store_true",
                       help="keep data loader workers alive between epochs")
    group.add_argument("--cache_latents", action="store_true",
                       help="encode every image once at start-up and train on the cached latents (kept for "
                            "this run only; not with random_crop or color_aug)")
    group.add_argument("--cache_latents_to_disk", action="store_true",
                       help="like --cache_latents (implies it), but keep the latents as "
                            "'<stem>_<W>x<H>_sd(xl).npz' beside the images, reused by later runs and by kohya")
    group.add_argument("--vae_batch_size", type=_vae_batch_size, default=1,
                       help="images per VAE batch when caching latents (0: the default, 1, as in kohya)")
    group.add_argument("--skip_cache_check", action="store_true",
                       help="trust existing latent cache files without checking them (faster start-up; a "
                            "changed image is then not noticed)")
    group.add_argument("--cache_text_encoder_outputs", action="store_true",
                       help="encode every caption once at start-up and train on the cached text-encoder outputs "
                            "(kept for this run only; captions must not change between draws)")
    group.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                       help="like --cache_text_encoder_outputs (implies it), but keep the outputs in "
                            "--text_encoder_cache_dir for later runs")
    group.add_argument("--text_encoder_cache_dir", type=str, default=None,
                       help="folder of the text-encoder output cache on disk; default: '.te_cache' inside the "
                            "first subset's image folder (or its metadata file's folder)")


def _face_crop_range(text: str) -> tuple[float, float]:
    try:
        return parse_face_crop_range(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"'{text}' {error}") from None


def _vae_batch_size(text: str) -> int:
    """argparse type: a batch size >= 1, where kohya's 0 means the default (1)."""
    return non_negative_int(text) or 1


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _check_bucket_reso_steps(args: argparse.Namespace) -> str | None:
    """Old kohya_ss presets carry bucket_reso_steps = 1; kohya refuses steps its models cannot take too (SDXL's
    scripts assert a multiple of 32), so say so before anything loads. The exact step per model family (64 for
    SD1.x/SD2.x) is checked when the buckets are made."""
    steps = getattr(args, "bucket_reso_steps", 64)
    if steps is not None and (steps < 32 or steps % 32):
        return (f"--bucket_reso_steps {steps} is not a multiple of 32: bucket sides must be multiples of 64 for "
                "SD1.x/SD2.x and of 32 for SDXL, as in kohya; set bucket_reso_steps = 64")
    return None


def _check_filter_args(args: argparse.Namespace) -> str | None:
    """Parse the filter options at start-up, so a typo fails before the model loads."""
    try:
        filter_from_args(args)
    except ValueError as error:
        return f"--conditioning_filter_args: {error}"
    return None


def add_conditioning_arguments(parser: argparse.ArgumentParser) -> None:
    """ControlNet conditioning flags (--conditioning_data_dir is a dataset flag, in add_dataset_arguments)."""
    group = parser.add_argument_group("ControlNet conditioning")
    group.add_argument("--conditioning_filter", type=str, choices=sorted(FILTERS), default=None,
                       help="compute each control image from the cropped training image with this filter "
                            "instead of reading --conditioning_data_dir")
    group.add_argument("--conditioning_filter_args", type=str, nargs="*", default=None, metavar="KEY=VALUE",
                       help="filter options, e.g. low=100 high=200 (canny) or radius=4 (blur)")
    group.add_argument("--conditioning_dropout_rate", type=_probability, default=0.0,
                       help="probability of training a sample with an all-zero control image (default 0)")
    group.add_argument("--control_fidelity_tolerance", type=non_negative_int, default=1,
                       help="pixels an edge may be off and still match, for the control-fidelity metric (default 1)")
    add_validator(parser, _check_filter_args)


def filter_from_args(args: argparse.Namespace) -> ConditioningFilter | None:
    """The filter the flags ask for, or None (control images come from --conditioning_data_dir)."""
    name = getattr(args, "conditioning_filter", None)
    options = getattr(args, "conditioning_filter_args", None) or []
    if name is None:
        if options:
            raise ValueError("options given without --conditioning_filter")
        return None
    return make_filter(name, options)


def data_loader_workers(args: argparse.Namespace) -> int:
    """--max_data_loader_n_workers capped at the CPU count, as kohya caps it: kohya's default 8 on a 2-core
    machine would start 8 workers (and torch warns that it may freeze). The count is of the CPUs this process
    may run on (what torch checks; kohya's os.cpu_count() counts a container's host CPUs too)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(max(0, int(args.max_data_loader_n_workers or 0)), usable or 1)


def latent_cache_mode(args: argparse.Namespace) -> CacheMode | None:
    """"disk" for --cache_latents_to_disk (which implies --cache_latents), "run" for --cache_latents, else None."""
    if getattr(args, "cache_latents_to_disk", False):
        return "disk"
    return "run" if getattr(args, "cache_latents", False) else None



def text_cache_mode(args: argparse.Namespace) -> CacheMode | None:
    """"disk" for --cache_text_encoder_outputs_to_disk (implies the other), "run" for
    --cache_text_encoder_outputs, else None."""
    if getattr(args, "cache_text_encoder_outputs_to_disk", False):
        return "disk"
    return "run" if getattr(args, "cache_text_encoder_outputs", False) else None


def dataset_flags_from_args(args: argparse.Namespace) -> DatasetFlags:
    """The dataset flags `load_dataset_configs` reads; a flag this parser lacks counts as not given."""
    key_values = {key: getattr(args, CLI_NAMES.get(key, key), None) for key in (*DATASET_KEYS, *SUBSET_KEYS, "alpha_mask")}
    if getattr(args, "caption_extention", None) is not None:  # kohya's old spelling wins when given
        key_values["caption_extension"] = args.caption_extention
    return DatasetFlags(
        dataset_config=getattr(args, "dataset_config", None),
        train_data_dir=getattr(args, "train_data_dir", None),
        reg_data_dir=getattr(args, "reg_data_dir", None),
        in_json=getattr(args, "in_json", None),
        conditioning_data_dir=getattr(args, "conditioning_data_dir", None),
        conditioning_filter=getattr(args, "conditioning_filter", None),
        prior_loss_weight=getattr(args, "prior_loss_weight", None),
        seed=getattr(args, "seed", None),
        key_values=key_values,
    )
