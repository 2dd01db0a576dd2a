"""Start-up checks that every optional piece a run asks for can be built, before data or models load.

A missing package or an impossible backend otherwise surfaces at the first sample, the first optimizer step
or deep inside accelerate, after the model (and maybe hours of training) is already spent. Each check here is
cheap (an import, a scheduler built from defaults) and turns the failure into one line naming the flag.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Callable

from library.cli.accelerate_args import accelerator_options_from_args
from library.cli.optim_args import optimizer_settings_from_args
from library.training import optim, sampling
from library.training.accelerate_utils import DEEPSPEED_INSTALL, check_xformers, resolve_log_with


class StartupCheckError(RuntimeError):
    """A flag asks for something this installation cannot provide; the message names the flag and the fix."""


def check_run_can_start(args: argparse.Namespace) -> None:
    """Raise StartupCheckError listing every piece the flags ask for that cannot be built here."""
    problems = []
    for check in CHECKS:
        try:
            check(args)
        except (ImportError, ValueError) as error:
            problems.append(" ".join(str(error).split()))
    if problems:
        raise StartupCheckError("; ".join(problems))


def _check_optimizer(args: argparse.Namespace) -> None:
    optim.optimizer_class(optimizer_settings_from_args(args).optimizer_type)


def _check_samplers(args: argparse.Namespace) -> None:
    """The run's --sample_sampler, and every sampler the prompt file names, when samples will be drawn."""
    if not getattr(args, "sample_prompts", None):
        return
    names = {args.sample_sampler}
    prompts = sampling.load_sample_prompts(args.sample_prompts, default_size=512)
    names.update(p.sampler for p in prompts if p.sampler)
    for name in sorted(names):
        try:
            sampling.check_sampler(name)
        except ImportError as error:
            flag = "--sample_sampler" if name == args.sample_sampler else f"--sample_prompts {args.sample_prompts}"
            raise ImportError(f"{flag}: {error}") from None


def _check_attention(args: argparse.Namespace) -> None:
    check_xformers(accelerator_options_from_args(args))


def _check_logging(args: argparse.Namespace) -> None:
    resolve_log_with(accelerator_options_from_args(args))


def _check_deepspeed(args: argparse.Namespace) -> None:
    if getattr(args, "deepspeed", False) and importlib.util.find_spec("deepspeed") is None:
        raise ImportError(f"--deepspeed needs the deepspeed package: {DEEPSPEED_INSTALL}")


CHECKS: tuple[Callable[[argparse.Namespace], None], ...] = (
    _check_optimizer, _check_samplers, _check_attention, _check_logging, _check_deepspeed)
