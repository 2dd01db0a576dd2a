"""kohya's Hugging Face Hub flags: upload each save (library.training.hub_upload) and resume from a Hub state."""

from __future__ import annotations

import argparse

from library.cli.config import add_validator
from library.training.hub_upload import REPO_TYPES, HubOptions, HubUpload, download_hub_state, parse_hub_state

VISIBILITY_CHOICES: tuple[str, ...] = ("public", "private")


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's names and defaults; a failed upload only warns (kohya logs an error and goes on, too)."""
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--huggingface_repo_id", type=str, default=None,
                       help="upload every saved model to this Hub repository (user/name; created if missing)")
    group.add_argument("--huggingface_repo_type", type=str, choices=REPO_TYPES, default=None,
                       help="type of the repository (default: model)")
    group.add_argument("--huggingface_path_in_repo", type=str, default=None,
                       help="folder in the repository the files go to (default: its root)")
    group.add_argument("--huggingface_token", type=str, default=None,
                       help="Hub token with write access (default: HF_TOKEN or `hf auth login`); never written out")
    group.add_argument("--huggingface_repo_visibility", type=str, choices=VISIBILITY_CHOICES, default=None,
                       help="visibility of a repository created by the run (default: private, as in kohya)")
    group.add_argument("--save_state_to_huggingface", action="store_true",
                       help="also upload each --save_state folder (needs --huggingface_repo_id)")
    group.add_argument("--resume_from_huggingface", action="store_true",
                       help="--resume names a Hub state: {repo_id}/{path_in_repo}[:{revision}[:{repo_type}]]; it "
                            "is downloaded, checked and resumed like a local one")
    group.add_argument("--async_upload", action="store_true",
                       help="upload in the background so training does not wait (the run waits at its end)")
    add_validator(parser, _check_hub_flags)


def _check_hub_flags(args: argparse.Namespace) -> str | None:
    if getattr(args, "resume_from_huggingface", False):
        resume = getattr(args, "resume", None)
        if not resume or resume == "auto":
            return ("--resume_from_huggingface needs --resume {repo_id}/{path_in_repo}[:{revision}[:{repo_type}]] "
                    f"(got {'--resume auto' if resume else 'no --resume'})")
    if getattr(args, "save_state_to_huggingface", False) and not getattr(args, "huggingface_repo_id", None):
        return "--save_state_to_huggingface needs --huggingface_repo_id (the repository to upload to)"
    return None


def hub_options_from_args(args: argparse.Namespace) -> HubOptions | None:
    """None when nothing is uploaded (no --huggingface_repo_id)."""
    repo_id = getattr(args, "huggingface_repo_id", None)
    if not repo_id:
        return None
    return HubOptions(repo_id=repo_id, repo_type=args.huggingface_repo_type,
                      path_in_repo=args.huggingface_path_in_repo, token=args.huggingface_token,
                      private=args.huggingface_repo_visibility != "public",
                      save_state=bool(args.save_state_to_huggingface), async_upload=bool(args.async_upload))


def hub_upload_callback(args: argparse.Namespace) -> HubUpload | None:
    options = hub_options_from_args(args)
    return HubUpload(options) if options is not None else None


def hub_resume_folder(args: argparse.Namespace, download=None) -> str | None:
    """With --resume_from_huggingface: the local folder the Hub state was downloaded to; else None."""
    if not getattr(args, "resume_from_huggingface", False) or not getattr(args, "resume", None):
        return None
    spec = parse_hub_state(args.resume)
    print(f"downloading the training state {spec.repo_id}/{spec.path_in_repo} from the Hugging Face Hub")
    return str(download_hub_state(spec, token=getattr(args, "huggingface_token", None), download=download))
