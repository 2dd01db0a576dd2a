"""Sample-image and validation-loss flags."""

from __future__ import annotations

import argparse

from library.cli.config import add_validator, non_negative_int
from library.training.sampling import DEFAULT_SAMPLER, SAMPLER_NAMES


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's sampling flags (names and defaults), plus a check that a trigger has a prompt file."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--sample_prompts", type=str, default=None,
                       help="prompt file (.txt, .toml or .json) for sample images during training")
    group.add_argument("--sample_every_n_steps", type=non_negative_int, default=None,
                       help="sample after every N optimizer steps (0: off, as in kohya)")
    group.add_argument("--sample_every_n_epochs", type=non_negative_int, default=None,
                       help="sample after every N epochs (wins over --sample_every_n_steps; 0: off, as in kohya)")
    group.add_argument("--sample_at_first", action="store_true", help="sample once before training starts")
    group.add_argument("--sample_sampler", type=str, choices=SAMPLER_NAMES, default=DEFAULT_SAMPLER,
                       help="sampler for the samples (a prompt's --ss overrides it)")
    add_validator(parser, _check_sampling)


def _check_sampling(args: argparse.Namespace) -> str | None:
    """A trigger without a prompt file would silently sample nothing."""
    triggers = [f"--{name}" for name in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first")
                if getattr(args, name, None)]
    if triggers and not getattr(args, "sample_prompts", None):
        return f"{', '.join(triggers)} needs --sample_prompts (a prompt file to sample)"
    return None


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation")
    group.add_argument("--validate_every_n_steps", type=int, default=None,
                       help="validation loss every N optimizer steps (needs a validation_split)")
    group.add_argument("--validate_every_n_epochs", type=int, default=None,
                       help="validation loss every N epochs (default: every epoch when a split is set)")
    group.add_argument("--max_validation_steps", type=int, default=None, help="at most this many validation batches")

