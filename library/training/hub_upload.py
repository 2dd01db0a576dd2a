"""Uploading saves to the Hugging Face Hub (kohya's --huggingface_* flags), and fetching a state to resume from.

An upload is a copy of what is already safe on disk: a failed one is a warning naming the file and the error,
never a lost run, and the local file stays. With ``async_upload`` one background worker uploads in save order
so the step never waits for the network; ``on_train_end`` waits for the queue to drain, as kohya's final upload
is synchronous. A queued upload works from hard links made at save time, so --save_last_n_* pruning (which
runs right after the save) or a later save under the same name cannot pull a file from under it.

The API object is injectable (``api=``): anything with ``create_repo``, ``upload_file`` and ``upload_folder``
like ``huggingface_hub.HfApi``; tests pass a recording fake. The token comes from the flag or huggingface_hub's
own login (HF_TOKEN, ``hf auth login``); it is never printed (``library.io.is_secret`` keeps it out of files).
"""

from __future__ import annotations

import os
import queue
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from tqdm.auto import tqdm

from library.training.checkpoints import StateError, TrainState
from library.training.loop import Callback, TrainingRun

REPO_TYPES: tuple[str, ...] = ("model", "dataset", "space")


@dataclass(frozen=True)
class HubOptions:
    """Where and what to upload: kohya's --huggingface_* flags, typed."""

    repo_id: str
    repo_type: str | None = None  # None: a model repository
    path_in_repo: str | None = None  # folder in the repository; None: its root
    token: str | None = None  # None: huggingface_hub's own login
    private: bool = True  # kohya: private unless --huggingface_repo_visibility public
    save_state: bool = False  # --save_state_to_huggingface
    async_upload: bool = False

    def destination(self, local: Path) -> str:
        """kohya's ``{path_in_repo}/{file or folder name}``."""
        prefix = (self.path_in_repo or "").strip("/")
        return f"{prefix}/{local.name}" if prefix else local.name


class HubApi(Protocol):
    """The subset of ``huggingface_hub.HfApi`` used here."""

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...

    def upload_file(self, *, path_or_fileobj: str, path_in_repo: str, repo_id: str, **kwargs: Any) -> Any: ...

    def upload_folder(self, *, folder_path: str, path_in_repo: str, repo_id: str, **kwargs: Any) -> Any: ...


def _stderr(line: str) -> None:
    tqdm.write(line, file=sys.stderr)  # on a line of its own, not after the progress bar


def _stdout(line: str) -> None:
    tqdm.write(line, file=sys.stdout)


@dataclass(frozen=True)
class _Upload:
    source: Path  # what is uploaded (a staged hard-link copy when asynchronous)
    original: Path  # the file or folder the run saved, named in messages
    path_in_repo: str


class HubUpload(Callback):
    """Uploads each save's model (and its state folder with ``save_state``) from the main process."""

    def __init__(self, options: HubOptions, *, api: HubApi | None = None,
                 warn: Callable[[str], None] = _stderr, say: Callable[[str], None] = _stdout) -> None:
        self.options = options
        self._api = api
        self.warn = warn
        self.say = say
        self.uploaded: list[tuple[Path, str]] = []  # (local path, path in repo), in upload order
        self.failed: list[tuple[Path, str]] = []  # (local path, error)
        self._repo_ready = False
        self._queue: queue.Queue[_Upload | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._staging: Path | None = None

    @property
    def api(self) -> HubApi:
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi(token=self.options.token)
        return self._api

    def on_save(self, run: TrainingRun, state: TrainState, model_path: Path, state_folder: Path | None) -> None:
        if not run.accelerator.is_main_process:
            return
        paths = [model_path] + ([state_folder] if self.options.save_state and state_folder is not None else [])
        for path in paths:
            self.submit(path)

    def on_train_end(self, run: TrainingRun, state: TrainState) -> None:
        self.finish()

    def submit(self, path: Path) -> None:
        """Upload ``path`` now, or queue it (staged) when asynchronous."""
        destination = self.options.destination(path)
        if not self.options.async_upload:
            self._upload(_Upload(path, path, destination))
            return
        try:
            source = self._stage(path)
        except OSError as error:  # no hard links on this file system: upload the file itself
            self.warn(f"warning: could not stage {path} for upload ({error}); uploading it in place")
            source = path
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="hub-upload", daemon=True)
            self._worker.start()
        self._queue.put(_Upload(source, path, destination))

    def finish(self) -> None:
        """Wait for queued uploads (at the end of training) and remove the staging folder."""
        if self._worker is not None:
            self.say("waiting for the Hugging Face Hub uploads to finish")
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _stage(self, path: Path) -> Path:
        """Hard links of ``path`` (a file or a folder tree) in a private folder beside it: free, and immune to the
        pruning and renaming that follow a save."""
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix=".hub-upload-", dir=path.parent))
        target = Path(tempfile.mkdtemp(dir=self._staging)) / path.name
        if path.is_dir():
            shutil.copytree(path, target, copy_function=os.link)
        else:
            os.link(path, target)
        return target

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            self._upload(job)
            if job.source != job.original:
                shutil.rmtree(job.source.parent, ignore_errors=True)

    def _upload(self, job: _Upload) -> None:
        options = self.options
        target = f"{options.repo_id}/{job.path_in_repo}"
        try:
            self._ensure_repo()
            common = dict(repo_id=options.repo_id, repo_type=options.repo_type, path_in_repo=job.path_in_repo)
            if job.source.is_dir():
                self.api.upload_folder(folder_path=str(job.source), **common)
            else:
                self.api.upload_file(path_or_fileobj=str(job.source), **common)
        except Exception as error:  # any failure of the network or the Hub: the run goes on
            message = self._redacted(f"{type(error).__name__}: {error}")
            self.failed.append((job.original, message))
            self.warn(f"warning: upload of {job.original} to the Hugging Face Hub ({target}) failed: {message}; "
                      "the local copy stays, training continues")
            return
        self.uploaded.append((job.original, job.path_in_repo))
        self.say(f"uploaded {job.original} to the Hugging Face Hub: {target}")

    def _ensure_repo(self) -> None:
        if self._repo_ready:
            return
        options = self.options
        self.api.create_repo(options.repo_id, repo_type=options.repo_type, private=options.private, exist_ok=True)
        self._repo_ready = True

    def _redacted(self, text: str) -> str:
        token = self.options.token
        return text.replace(token, "***") if token else text


@dataclass(frozen=True)
class HubStateSpec:
    """kohya's ``--resume {repo_id}/{path_in_repo}:{revision}:{repo_type}`` with --resume_from_huggingface."""

    repo_id: str
    path_in_repo: str
    revision: str | None = None
    repo_type: str | None = None


def parse_hub_state(text: str) -> HubStateSpec:
    """``user/repo/folder[:revision[:repo_type]]``; a malformed one is a StateError naming the expected form."""
    form = "--resume_from_huggingface needs --resume {repo_id}/{path_in_repo}[:{revision}[:{repo_type}]]"
    location, *rest = text.split(":")
    parts = [p for p in location.split("/") if p]
    if len(parts) < 3 or len(rest) > 2:
        raise StateError(f"{form} (e.g. user/my-lora/my-lora-step00000100-state:main), got {text!r}")
    revision = rest[0] or None if rest else None
    repo_type = rest[1] or None if len(rest) == 2 else None
    if repo_type is not None and repo_type not in REPO_TYPES:
        raise StateError(f"--resume {text}: repo type {repo_type!r} is not one of {', '.join(REPO_TYPES)}")
    return HubStateSpec(repo_id="/".join(parts[:2]), path_in_repo="/".join(parts[2:]), revision=revision,
                        repo_type=repo_type)


def download_hub_state(spec: HubStateSpec, *, token: str | None = None,
                       download: Callable[..., str] | None = None) -> Path:
    """The state folder ``spec`` names, downloaded (huggingface_hub's cache) and returned as a local path.

    ``download`` has ``huggingface_hub.snapshot_download``'s signature (injectable for tests).
    """
    if download is None:
        from huggingface_hub import snapshot_download as download
    where = f"{spec.repo_id}/{spec.path_in_repo}" + (f"@{spec.revision}" if spec.revision else "")
    try:
        root = download(repo_id=spec.repo_id, repo_type=spec.repo_type, revision=spec.revision,
                        allow_patterns=[f"{spec.path_in_repo}/*"], token=token)
    except Exception as error:  # offline, unreachable, no such repo or revision, no access
        message = f"{type(error).__name__}: {error}"
        message = message.replace(token, "***") if token else message
        raise StateError(f"--resume_from_huggingface: could not download {where}: {message.splitlines()[0]}") from error
    folder = Path(root) / spec.path_in_repo
    if not folder.is_dir() or not any(folder.iterdir()):
        raise StateError(f"--resume_from_huggingface: {where} holds no state folder (check the path in the repo "
                         "and the revision)")
    return folder
