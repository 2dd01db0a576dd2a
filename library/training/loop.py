"""The one training loop that train_network.py, train_sdxl.py and train_controlnet.py share.

A script builds a `Trainee` (what is trained and how it predicts) and a `TrainingRun` (data, optimizer,
schedule, options), then calls `train`. One optimizer step, top to bottom:

    batch -> latents (cached, or VAE-encoded)        -> noise, timesteps, noisy latents  (library.noise)
          -> text conditioning (cached, or encoded)  -> trainee.predict(...)             (UNet [+ LoRA/ControlNet])
          -> loss (weighted, masked)                 -> backward, clip, optimizer + scheduler step
          -> log, sample images, save               (library.sampling, library.checkpoints)

Every random draw of a step comes from generators seeded with (seed, step, rank, micro-step), and the data
order from (seed, epoch); so a run interrupted with --save_state and continued with --resume ends with the
same weights as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from library.training import noise as noise_lib
from library.training.optim import is_schedule_free
from library.training.checkpoints import SaveSettings, TrainState, outdated_epoch_names, outdated_step_names, remove_paths
from library.training.train_state_io import state_before_divergence
from library.training.output_checks import raise_save_failure, save_failure, save_failures
from library.models.text_encoding import EncodedPrompts, PromptEncoder


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (a non-finite loss); the message says what was saved and what to try."""


class Trainee(Protocol):
    """What a script trains: LoRA on a frozen UNet, the full UNet, or a ControlNet."""

    trains_text_encoder: bool

    def trainable_modules(self) -> dict[str, nn.Module]: ...

    def use_prepared(self, modules: dict[str, nn.Module]) -> None:
        """The modules after accelerator.prepare (DDP/DeepSpeed wrappers): forwards must go through them."""

    def set_train(self, training: bool) -> None: ...

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: EncodedPrompts,
                added_cond_kwargs: dict[str, torch.Tensor] | None, batch: dict[str, Any]) -> torch.Tensor: ...

    def save(self, path: Path, step: int, epoch: int) -> None: ...

    def after_step(self, global_step: int) -> None:
        """Called after every optimizer step (EMA updates)."""

    def evaluation_weights(self) -> contextlib.AbstractContextManager:
        """The weights to sample, validate and save with (EMA weights when EMA is on)."""


@dataclass
class TrainingPlan:
    """The step/epoch arithmetic kohya users keep asking about, printed before step 1."""

    num_images: int
    num_reg_images: int
    samples_per_epoch: int
    batch_size: int
    gradient_accumulation_steps: int
    num_processes: int
    batches_per_epoch_per_process: int
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    short_batches: int = 0
    repeated_batches: int = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.num_processes

    def format(self) -> str:
        lines = [
            f"images: {self.num_images} train + {self.num_reg_images} regularisation -> {self.samples_per_epoch} samples per epoch (with repeats)",
            f"batches per epoch per process: {self.batches_per_epoch_per_process} "
            f"({self.short_batches} short last-of-bucket batches kept, {self.repeated_batches} repeated to even out ranks)",
            f"global batch: {self.batch_size} per device x {self.gradient_accumulation_steps} accumulation x "
            f"{self.num_processes} process(es) = {self.global_batch}",
            f"optimizer steps: {self.steps_per_epoch} per epoch, {self.max_train_steps} in total over {self.num_epochs} epoch(s)",
        ]
        return "\n".join(lines)


def make_plan(num_images: int, num_reg_images: int, samples_per_epoch: int, batch_size: int,
              batches_per_epoch_per_process: int, gradient_accumulation_steps: int, num_processes: int,
              max_train_steps: int | None, max_train_epochs: int | None, short_batches: int = 0,
              repeated_batches: int = 0) -> TrainingPlan:
    """--max_train_epochs wins over --max_train_steps, as in kohya."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch_per_process / gradient_accumulation_steps))
    if max_train_epochs:
        total = steps_per_epoch * max_train_epochs
    elif max_train_steps:
        total = max_train_steps
    else:
        raise ValueError("set --max_train_steps or --max_train_epochs")
    epochs = math.ceil(total / steps_per_epoch)
    return TrainingPlan(num_images, num_reg_images, samples_per_epoch, batch_size, gradient_accumulation_steps,
                        num_processes, batches_per_epoch_per_process, steps_per_epoch, total, epochs,
                        short_batches, repeated_batches)


def sdxl_time_ids(batch: dict[str, Any]) -> torch.Tensor:
    """(B, 6) SDXL micro-conditioning in diffusers' order: original (h, w), crop (top, left), target (h, w)."""
    return torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]], dim=1)


@dataclass
class TrainingRun:
    """Everything the loop needs besides the trainee; built by the script."""

    accelerator: Any
    trainee: Trainee
    vae: nn.Module
    latent_scaling_factor: float
    prompt_encoder: PromptEncoder
    is_sdxl: bool
    dataloader: Any  # yields collated batches (library.datasets.collate_samples)
    batch_sampler: Any  # KeyedBatchSampler: set_epoch / state_dict / load_state_dict
    prepared: Any  # accelerate_utils.PreparedTraining: optimizer, scheduler, backward/clip/autocast
    plan: TrainingPlan
    seed: int
    prediction_type: str
    alphas_cumprod: torch.Tensor
    noise_options: noise_lib.NoiseOptions
    loss_options: noise_lib.LossOptions
    save: SaveSettings
    max_grad_norm: float = 1.0
    prior_loss_weight: float = 1.0
    vae_dtype: torch.dtype = torch.float32
    weight_dtype: torch.dtype = torch.float32
    sample: Callable[[int, int | None], None] | None = None  # sample(step, epoch) at the configured points
    should_sample: Callable[[int, int, bool], bool] | None = None  # (step, epoch, is_epoch_end) -> bool
    sample_at_first: bool = False
    validate: Callable[[], float] | None = None  # mean validation loss (library.validation)
    should_validate: Callable[[int, int, bool], bool] | None = None  # (step, epoch, is_epoch_end) -> bool
    start: TrainState | None = None  # resume point
    log_every: int = 1
    extra_logs: Callable[[], dict[str, float]] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    state_io: Any = None  # library.train_state_io.TrainingStateIO: writes the --save_state folders
    resumed_from: Path | None = None  # the --resume folder
    saved_states: list[tuple[int, Path]] = field(default_factory=list)  # (step, folder) of this run's states


def _latents(run: TrainingRun, batch: dict[str, Any], device: torch.device, generator: torch.Generator) -> torch.Tensor:
    if batch.get("latents") is not None:
        return batch["latents"].to(device, dtype=torch.float32) * run.latent_scaling_factor
    pixels = batch["pixel_values"].to(device, dtype=run.vae_dtype)
    with torch.no_grad():
        latents = run.vae.encode(pixels).latent_dist.sample(generator=generator)
    latents = latents.to(torch.float32) * run.latent_scaling_factor
    if not torch.isfinite(latents).all():
        raise TrainingStopped(
            "the VAE produced NaN/inf latents for " + ", ".join(map(str, batch.get("image_paths", [])))
            + (" (the SDXL VAE overflows in fp16: add --no_half_vae)" if run.is_sdxl else "")
        )
    return latents


def _text(run: TrainingRun, batch: dict[str, Any], device: torch.device) -> EncodedPrompts:
    if batch.get("text_hidden_states") is not None:
        pooled = batch.get("text_pooled")
        return EncodedPrompts(batch["text_hidden_states"].to(device, run.weight_dtype),
                              None if pooled is None else pooled.to(device, run.weight_dtype))
    with torch.set_grad_enabled(run.trainee.trains_text_encoder):
        encoded = run.prompt_encoder.encode(batch["captions"])
    return EncodedPrompts(encoded.hidden_states.to(device), None if encoded.pooled is None else encoded.pooled.to(device))


def _loss_for_batch(run: TrainingRun, batch: dict[str, Any], step: int, micro_step: int) -> torch.Tensor:
    # Seeded by position (the micro-batch index of the whole run): a resumed run draws the same noise, and
    # the global RNG that dropout layers use is reseeded too, so nothing depends on what ran before.
    micro_index = step * run.plan.gradient_accumulation_steps + micro_step
    generator = noise_lib.step_generator(run.seed, micro_index, run.accelerator.process_index,
                                         device=run.accelerator.device)
    return batch_loss(run, batch, generator)


def batch_loss(run: TrainingRun, batch: dict[str, Any], generator: torch.Generator,
               timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted loss of one batch; every random draw comes from ``generator`` (timesteps too, unless given)."""
    accelerator = run.accelerator
    device = accelerator.device
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item()))
    latents = _latents(run, batch, device, generator)
    noise = noise_lib.sample_noise(latents, run.noise_options, generator)
    if timesteps is None:
        timesteps = noise_lib.sample_timesteps(latents.shape[0], run.noise_options, generator)
    timesteps = timesteps.to(device)
    alphas_cumprod = run.alphas_cumprod.to(device)
    noisy = noise_lib.add_noise(latents, noise, timesteps, alphas_cumprod, run.noise_options, generator)
    target = noise_lib.training_target(latents, noise, timesteps, alphas_cumprod, run.prediction_type)
    text = _text(run, batch, device)
    added = None
    if run.is_sdxl:
        added = {"text_embeds": text.pooled.to(device), "time_ids": sdxl_time_ids(batch).to(device, text.hidden_states.dtype)}
    with run.prepared.autocast() if run.prepared.uses_deepspeed else accelerator.autocast():
        prediction = run.trainee.predict(noisy.to(run.weight_dtype), timesteps, text, added, batch)
    weights = torch.where(batch["is_reg"].to(device), run.prior_loss_weight, 1.0).to(torch.float32)
    mask = batch.get("alpha_masks") if run.loss_options.masked_loss else None
    loss, _ = noise_lib.training_loss(prediction.float(), target.float(), timesteps, alphas_cumprod,
                                      run.prediction_type, run.loss_options, mask=None if mask is None else mask.to(device),
                                      sample_weights=weights)
    return loss


def _all_finite(accelerator: Any, loss: torch.Tensor) -> bool:
    """Every rank must agree, or one would step while another stops."""
    flag = torch.tensor([1.0 if torch.isfinite(loss).item() else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def _epochs(run: TrainingRun) -> Iterator[tuple[int, int]]:
    """(epoch, batches already consumed in it) from the resume point on."""
    first_epoch, skip = 1, 0
    if run.start is not None:
        first_epoch, skip = run.start.epoch, run.start.batches_done_in_epoch
        if skip >= run.plan.batches_per_epoch_per_process:
            first_epoch, skip = first_epoch + 1, 0
    for epoch in range(first_epoch, run.plan.num_epochs + 1):
        yield epoch, (skip if epoch == first_epoch else 0)


@contextlib.contextmanager
def _evaluation(run: TrainingRun, trainee_weights: bool = True) -> Iterator[None]:
    """Models in eval mode, and schedule-free optimizers on their averaged weights, for sampling and saving.

    ``trainee_weights`` also swaps in the trainee's evaluation weights (EMA); saving leaves that to the trainee,
    which may write both the EMA and the raw weights.
    """
    optimizer = run.prepared.optimizer
    schedule_free = is_schedule_free(optimizer)
    run.trainee.set_train(False)
    if schedule_free:
        optimizer.eval()
    try:
        with run.trainee.evaluation_weights() if trainee_weights else contextlib.nullcontext():
            yield
    finally:
        if schedule_free:
            optimizer.train()
        run.trainee.set_train(True)


def _save_model(run: TrainingRun, name: str, step: int, epoch: int) -> Path:
    path = run.save.model_path(name)
    with _evaluation(run, trainee_weights=False):
        failure = None
        if run.accelerator.is_main_process:
            try:
                run.trainee.save(path, step, epoch)
            except save_failures() as error:  # a full disk: one line, and every rank stops
                failure = error
        raise_save_failure(run.accelerator, path, failure, run.save)
        run.accelerator.wait_for_everyone()
    return path


def _save_state(run: TrainingRun, name: str, state: TrainState, regular: bool = True) -> Path:
    path = run.save.state_path(name)
    try:
        folder = run.state_io.save(path, state)
    except save_failures() as error:
        raise save_failure(path, error, run.save) from error
    if regular:  # a candidate to resume from after a NaN/inf stop
        run.saved_states.append((state.global_step, folder))
    return folder


def train(run: TrainingRun) -> TrainState:
    """Run the optimizer steps of ``run.plan`` and return where training ended."""
    accelerator, plan = run.accelerator, run.plan
    global_step = run.start.global_step if run.start else 0
    progress = tqdm(total=plan.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process, smoothing=0)
    if run.sample is not None and run.sample_at_first and global_step == 0:
        with _evaluation(run):
            run.sample(0, 0)
    loss_window: list[float] = []
    run.trainee.set_train(True)
    epoch = run.start.epoch if run.start else 1
    batches_done = 0
    for epoch, skip in _epochs(run):
        if global_step >= plan.max_train_steps:
            break
        run.batch_sampler.set_epoch(epoch, first_step=global_step)
        if skip:
            run.batch_sampler.load_state_dict({"epoch": epoch, "batches_done": skip, "seed": run.seed})
            run.batch_sampler.set_epoch(epoch, first_step=global_step)
        batches_done = skip
        micro_step = 0
        for batch in run.dataloader:
            with accelerator.accumulate(*run.prepared.models.values()):
                loss = _loss_for_batch(run, batch, global_step, micro_step)
                if not _all_finite(accelerator, loss):
                    progress.close()  # the error line then starts a line of its own
                    _stop_on_nan(run, global_step, epoch, batches_done)
                run.prepared.backward(loss)
                run.prepared.clip_grad_norm(run.max_grad_norm)
                run.prepared.optimizer.step()
                run.prepared.lr_scheduler.step()
                run.prepared.optimizer.zero_grad(set_to_none=True)
            batches_done += 1
            micro_step += 1
            loss_window.append(loss.detach().item())
            if not accelerator.sync_gradients:
                continue
            micro_step = 0
            global_step += 1
            run.trainee.after_step(global_step)
            logs = {"loss/current": loss_window[-1], "loss/average": sum(loss_window[-100:]) / len(loss_window[-100:]),
                    "lr": float(run.prepared.lr_scheduler.get_last_lr()[0])}
            if run.extra_logs:
                logs.update(run.extra_logs())
            run.history.append({"step": global_step, **logs})
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss/average']:.4f}", lr=f"{logs['lr']:.2e}")
            if global_step % run.log_every == 0:
                accelerator.log(logs, step=global_step)
            state = TrainState(global_step, epoch, batches_done, run.seed, accelerator.num_processes)
            _after_step(run, state)
            if global_step >= plan.max_train_steps:
                break
        if global_step < plan.max_train_steps or batches_done >= plan.batches_per_epoch_per_process:
            _after_epoch(run, TrainState(global_step, epoch, batches_done, run.seed, accelerator.num_processes))
    progress.close()
    final = TrainState(global_step, epoch, batches_done, run.seed, accelerator.num_processes)
    _save_model(run, run.save.output_name, global_step, epoch)
    if run.save.save_state or run.save.save_state_on_train_end:
        _save_state(run, run.save.output_name, final)
    return final


def _validate(run: TrainingRun, step: int, epoch: int, is_epoch_end: bool) -> None:
    if run.validate is None or run.should_validate is None or not run.should_validate(step, epoch, is_epoch_end):
        return
    with _evaluation(run), torch.no_grad():
        loss = run.validate()
    run.accelerator.log({"loss/validation": loss}, step=step)
    run.history.append({"step": step, "loss/validation": loss})


def _after_step(run: TrainingRun, state: TrainState) -> None:
    step = state.global_step
    _validate(run, step, state.epoch, False)
    if run.sample is not None and run.should_sample is not None and run.should_sample(step, state.epoch, False):
        with _evaluation(run):
            run.sample(step, None)
    if run.save.due_at_step(step) and step < run.plan.max_train_steps:
        _save_model(run, run.save.step_name(step), step, state.epoch)
        if run.save.save_state:
            _save_state(run, run.save.step_name(step), state)
        _prune(run, outdated_step_names(run.save, step, run.save.last_n_steps),
               outdated_step_names(run.save, step, run.save.last_n_steps_state or run.save.last_n_steps))


def _after_epoch(run: TrainingRun, state: TrainState) -> None:
    epoch = state.epoch
    _validate(run, state.global_step, epoch, True)
    if run.sample is not None and run.should_sample is not None and run.should_sample(state.global_step, epoch, True):
        with _evaluation(run):
            run.sample(state.global_step, epoch)
    if run.save.due_at_epoch(epoch, run.plan.num_epochs):
        _save_model(run, run.save.epoch_name(epoch), state.global_step, epoch)
        if run.save.save_state:
            _save_state(run, run.save.epoch_name(epoch), state)
        _prune(run, outdated_epoch_names(run.save, epoch, run.save.last_n_epochs),
               outdated_epoch_names(run.save, epoch, run.save.last_n_epochs_state or run.save.last_n_epochs))


def _prune(run: TrainingRun, model_names: list[str], state_names: list[str]) -> None:
    if not run.accelerator.is_main_process:
        return
    remove_paths([run.save.model_path(n) for n in model_names] + [run.save.state_path(n) for n in state_names])


def _stop_on_nan(run: TrainingRun, step: int, epoch: int, batches_done: int) -> None:
    """Stop, keep the weights at the stop for inspection, and name the newest state from before the divergence.

    The weights at the stop are finite (the optimizer has not stepped on the bad loss) but usually already
    diverged (at a huge learning rate they are ~1e10 in size), so resuming from them fails again: the state to
    resume from is the newest one saved before the loss exploded.
    """
    name = f"{run.save.output_name}-nan-step{step:08d}"
    path = _save_model(run, name, step, epoch)
    _save_state(run, name, TrainState(step, epoch, batches_done, run.seed, run.accelerator.num_processes), regular=False)
    candidates = list(run.saved_states)
    if run.resumed_from is not None and run.start is not None:
        candidates.append((run.start.global_step, run.resumed_from))
    good = state_before_divergence(candidates, run.history, step)
    if good is not None:
        advice = f"resume from {good}, the newest state saved before the loss diverged, with a lower --learning_rate"
    else:
        advice = ("no state was saved before the loss diverged: add --save_state --save_every_n_steps N to keep "
                  "states to resume from, and start again with a lower --learning_rate")
    raise TrainingStopped(
        f"the loss became NaN/inf at step {step + 1} (epoch {epoch}); the weights at the stop ({path}) have diverged; "
        f"{advice}. Also consider --mixed_precision bf16 instead of fp16, or --no_half_vae for SDXL."
    )


def wall_clock() -> float:
    return time.perf_counter()
