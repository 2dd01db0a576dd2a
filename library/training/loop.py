"""The one training loop that train_network.py, train_sdxl.py and train_controlnet.py share.

A script builds a `Trainee` (what is trained and how it predicts) and a `TrainingRun` (data, optimizer,
schedule, options, callbacks), then calls `train`. One optimizer step, top to bottom:

    batch -> latents (cached, or VAE-encoded)        -> noise, timesteps, noisy latents  (training.noise)
          -> text conditioning (cached, or encoded)  -> trainee.predict(...)             (UNet [+ LoRA/ControlNet])
          -> loss (weighted, masked)                 -> backward, clip, optimizer + scheduler step
          -> callbacks: EMA, log, validate, sample   -> save                             (training.callbacks)

Every random draw of a step comes from generators seeded with (seed, the batch's index in the global batch
order), and the data order from (seed, epoch); so a run interrupted with --save_state and continued with
--resume ends with the same weights as one that was never interrupted, on the same or another process count
(library.training.process_count).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from library.training import noise as noise_lib
from library.training.optim import is_schedule_free
from library.training.process_count import SAVED_PROCESSES
from library.training.checkpoints import SaveSettings, TrainState, outdated_epoch_names, outdated_step_names, remove_paths
from library.training.output_checks import raise_save_failure, save_failure, save_failures
from library.training.sharded_state import complete_weights
from library.data.datasets import Batch
from library.data.pixels import normalize_pixels
from library.models.families import ModelFamily
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

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor] | None, batch: Batch) -> torch.Tensor:
        """The UNet's output; the loop has cast every tensor argument to the weight dtype."""

    def save(self, path: Path, step: int, epoch: int) -> None: ...

    def evaluation_weights(self) -> contextlib.AbstractContextManager:
        """The weights to sample, validate and save with (EMA weights when EMA is on)."""


class Callback:
    """A hook into the loop, given to `TrainingRun` at construction; override the points you need.

    Every hook gets the run (accelerator, trainee, optimizer: ``run.prepared``) and where training stands. In
    each hook the callbacks are called in the order given. Sampling, validation, EMA, the NaN guard and the
    benchmark clock are callbacks (library.training.callbacks); tests hook in the same way.
    """

    def on_train_start(self, run: "TrainingRun", state: TrainState) -> None:
        """Before the first step of this process (step 0, or the resume point)."""

    def before_batch(self, run: "TrainingRun", batch: Batch) -> None:
        """A batch is about to be trained or validated, before its text is encoded: set what depends on the
        batch (train_network.py sets the network multiplier of the batch's dataset here)."""

    def after_optimizer_step(self, run: "TrainingRun", state: TrainState) -> dict[str, float]:
        """The weights have just stepped: change them (EMA, max-norm) and return scalars to log with the step."""
        return {}

    def on_step_end(self, run: "TrainingRun", state: TrainState, logs: dict[str, float]) -> None:
        """After the step's ``logs`` are written, before the step's save: validate, sample."""

    def on_epoch_end(self, run: "TrainingRun", state: TrainState) -> None:
        """After the last step of an epoch, before the epoch's save."""

    def on_save(self, run: "TrainingRun", state: TrainState, model_path: Path, state_folder: Path | None) -> None:
        """After a regular save (step, epoch or final): the model file and the --save_state folder, if any."""

    def on_nonfinite_loss(self, run: "TrainingRun", state: TrainState) -> None:
        """The loss is NaN/inf on some rank before ``state``'s step: save what helps and raise TrainingStopped."""

    def on_train_end(self, run: "TrainingRun", state: TrainState) -> None:
        """After the final save."""


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
    num_nodes: int = 1  # machines the processes run on (multi-node launches)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.num_processes

    def format(self) -> str:
        lines = [
            f"images: {self.num_images} train + {self.num_reg_images} regularisation -> {self.samples_per_epoch} samples per epoch (with repeats)",
            f"batches per epoch per process: {self.batches_per_epoch_per_process} "
            f"({self.short_batches} short last-of-bucket batches kept, {self.repeated_batches} repeated to even out ranks)",
            f"processes: {self.num_nodes} node(s) x {self.num_processes // self.num_nodes} per node = "
            f"{self.num_processes}",
            f"global batch: {self.batch_size} per device x {self.gradient_accumulation_steps} accumulation x "
            f"{self.num_processes} process(es) = {self.global_batch}",
            f"optimizer steps: {self.steps_per_epoch} per epoch, {self.max_train_steps} in total over {self.num_epochs} epoch(s)",
        ]
        return "\n".join(lines)


def make_plan(*, num_images: int, num_reg_images: int, samples_per_epoch: int, batch_size: int,
              batches_per_epoch_per_process: int, gradient_accumulation_steps: int, num_processes: int,
              max_train_steps: int | None, max_train_epochs: int | None, short_batches: int = 0,
              repeated_batches: int = 0, num_nodes: int = 1) -> TrainingPlan:
    """Optimizer steps per epoch and in total; --max_train_epochs wins over --max_train_steps, as in kohya."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch_per_process / gradient_accumulation_steps))
    if max_train_epochs:
        total = steps_per_epoch * max_train_epochs
    elif max_train_steps:
        total = max_train_steps
    else:
        raise ValueError("set --max_train_steps or --max_train_epochs")
    epochs = math.ceil(total / steps_per_epoch)
    return TrainingPlan(num_images=num_images, num_reg_images=num_reg_images, samples_per_epoch=samples_per_epoch,
                        batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
                        num_processes=num_processes, batches_per_epoch_per_process=batches_per_epoch_per_process,
                        steps_per_epoch=steps_per_epoch, max_train_steps=total, num_epochs=epochs,
                        short_batches=short_batches, repeated_batches=repeated_batches, num_nodes=num_nodes)


@dataclass(frozen=True)
class TrainingRun:
    """Everything one run of the loop needs, built once by the script flow (library.cli.script_flow)."""

    accelerator: Any
    trainee: Trainee
    vae: nn.Module
    latent_scaling_factor: float
    prompt_encoder: PromptEncoder
    family: ModelFamily  # what the UNet is conditioned on besides the text; the VAE's overflow hint
    dataloader: Any  # yields library.data.datasets.Batch (collate_samples)
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
    start: TrainState | None = None  # resume point
    state_io: Any = None  # library.training.train_state_io.TrainingStateIO: writes the --save_state folders
    callbacks: Sequence[Callback] = ()  # called in this order at each hook (see Callback)


def _latents(run: TrainingRun, batch: Batch, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    if batch.latents is not None:
        return batch.latents.to(device, dtype=torch.float32) * run.latent_scaling_factor
    if batch.pixel_values is None:
        raise ValueError("a batch needs pixel_values or latents")
    # uint8 crosses to the device (a quarter of float32's bytes) and becomes [-1, 1] there
    pixels = normalize_pixels(batch.pixel_values.to(device), run.vae_dtype)
    with torch.no_grad():
        latents = run.vae.encode(pixels).latent_dist.sample(generator=generator)
    latents = latents.to(torch.float32) * run.latent_scaling_factor
    if not torch.isfinite(latents).all():
        raise TrainingStopped(
            "the VAE produced NaN/inf latents for " + ", ".join(map(str, batch.image_paths))
            + (f" ({run.family.vae_overflow_hint})" if run.family.vae_overflow_hint else "")
        )
    return latents


def _text(run: TrainingRun, batch: Batch, device: torch.device) -> EncodedPrompts:
    if batch.text_hidden_states is not None:
        pooled = batch.text_pooled
        return EncodedPrompts(batch.text_hidden_states.to(device, run.weight_dtype),
                              None if pooled is None else pooled.to(device, run.weight_dtype))
    # Under autocast, as kohya encodes: adapters on the text encoder (LyCORIS's build float32 weight updates)
    # then compute in the mixed-precision dtype like the layers they wrap.
    with torch.set_grad_enabled(run.trainee.trains_text_encoder), _autocast(run):
        encoded = run.prompt_encoder.encode(batch.captions)
    return EncodedPrompts(encoded.hidden_states.to(device), None if encoded.pooled is None else encoded.pooled.to(device))


def _autocast(run: TrainingRun) -> contextlib.AbstractContextManager:
    return run.prepared.autocast() if run.prepared.uses_deepspeed else run.accelerator.autocast()


def global_micro_index(*, step: int, micro_step: int, accumulation: int, num_processes: int, rank: int) -> int:
    """The batch's index in the run's global batch order: rank r takes batches r, r + N, ... of it, so micro-step
    j of step s on rank r is ``(s * accumulation + j) * N + r``. N processes with accumulation A and one process
    with N x A reach each index with the same batch (and one process keeps the index it always had)."""
    return (step * accumulation + micro_step) * num_processes + rank


def _loss_for_batch(run: TrainingRun, batch: Batch, step: int, micro_step: int) -> torch.Tensor:
    # Seeded by position (the global micro-batch index of the whole run): a resumed run draws the same noise,
    # on any process count, and the global RNG that dropout layers use is reseeded too, so nothing depends on
    # what ran before.
    micro_index = global_micro_index(step=step, micro_step=micro_step,
                                     accumulation=run.plan.gradient_accumulation_steps,
                                     num_processes=run.accelerator.num_processes, rank=run.accelerator.process_index)
    generator = noise_lib.step_generator(run.seed, micro_index, 0, device=run.accelerator.device)
    return batch_loss(run, batch, generator)


def batch_loss(run: TrainingRun, batch: Batch, generator: torch.Generator,
               timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted loss of one batch; every random draw comes from ``generator`` (timesteps too, unless given)."""
    accelerator = run.accelerator
    device = accelerator.device
    for callback in run.callbacks:
        callback.before_batch(run, batch)
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
    added = run.family.unet_added_conditions(text.pooled, original_sizes_hw=batch.original_sizes_hw,
                                             crop_top_lefts=batch.crop_top_lefts, target_sizes_hw=batch.target_sizes_hw,
                                             device=device, dtype=text.hidden_states.dtype)
    dtype = run.weight_dtype  # every trainee gets its float inputs in the weight dtype, cast here only
    with _autocast(run):
        prediction = run.trainee.predict(noisy.to(dtype), timesteps, text.hidden_states.to(dtype),
                                         _cast(added, dtype), batch)
    weights = torch.where(batch.is_reg.to(device), run.prior_loss_weight, 1.0).to(torch.float32)
    mask = batch.alpha_masks if run.loss_options.masked_loss else None
    loss, _ = noise_lib.training_loss(prediction.float(), target.float(), timesteps, alphas_cumprod,
                                      run.prediction_type, run.loss_options, mask=None if mask is None else mask.to(device),
                                      sample_weights=weights)
    return loss


def _cast(tensors: dict[str, torch.Tensor] | None, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {k: v.to(dtype) for k, v in tensors.items()}


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
def evaluation(run: TrainingRun, trainee_weights: bool = True) -> Iterator[None]:
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


def save_model(run: TrainingRun, name: str, step: int, epoch: int) -> Path:
    """The trainee's weights as ``name`` in --output_dir (main process); a failed save stops every rank."""
    path = run.save.model_path(name)
    # ZeRO-3 / FSDP: every rank helps gather the complete weights the main process writes
    saved = getattr(run.trainee, "saved_modules", None) or run.trainee.trainable_modules
    saved = saved()
    with evaluation(run, trainee_weights=False), complete_weights(run.accelerator, saved.values()):
        failure = None
        if run.accelerator.is_main_process:
            try:
                run.trainee.save(path, step, epoch)
            except save_failures() as error:  # a full disk: one line, and every rank stops
                failure = error
        raise_save_failure(run.accelerator, path, failure, run.save)
        run.accelerator.wait_for_everyone()
    return path


def save_state(run: TrainingRun, name: str, state: TrainState) -> Path:
    """A --save_state folder (weights, optimizer, scheduler, RNG, data position) to resume from."""
    path = run.save.state_path(name)
    try:
        return run.state_io.save(path, state)
    except save_failures() as error:
        raise save_failure(path, error, run.save) from error


def _where(run: TrainingRun, global_step: int, epoch: int, batches_done: int) -> TrainState:
    # a sampler whose order depends on more than (seed, epoch, processes) records it (a shard stream: its workers)
    requirements = getattr(run.batch_sampler, "resume_requirements", None)
    return TrainState(global_step, epoch, batches_done, run.seed, run.accelerator.num_processes,
                      extra=requirements() if requirements is not None else None)


def train(run: TrainingRun) -> TrainState:
    """Run the optimizer steps of ``run.plan`` and return where training ended."""
    accelerator, plan, callbacks = run.accelerator, run.plan, run.callbacks
    global_step = run.start.global_step if run.start else 0
    epoch = run.start.epoch if run.start else 1
    batches_done = 0
    progress = tqdm(total=plan.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process, smoothing=0)
    for callback in callbacks:
        callback.on_train_start(run, run.start or _where(run, 0, 1, 0))
    loss_window: list[float] = []
    run.trainee.set_train(True)
    for epoch, skip in _epochs(run):
        if global_step >= plan.max_train_steps:
            break
        run.batch_sampler.set_epoch(epoch, first_step=global_step)
        if skip:
            # this rank's position, the same in the epoch's global batch order, and the process count that saved
            # it (a state of another count: library.training.process_count); a sampler that cannot follow refuses
            saved_by = (run.start.extra or {}).get(SAVED_PROCESSES, accelerator.num_processes)
            run.batch_sampler.load_state_dict({"epoch": epoch, "batches_done": skip, "seed": run.seed,
                                               "global_batches_done": skip * accelerator.num_processes,
                                               SAVED_PROCESSES: saved_by})
            run.batch_sampler.set_epoch(epoch, first_step=global_step)
        batches_done = skip
        micro_step = 0
        for batch in run.dataloader:
            with accelerator.accumulate(*run.prepared.models.values()):
                loss = _loss_for_batch(run, batch, global_step, micro_step)
                if not _all_finite(accelerator, loss):
                    progress.close()  # the error line then starts a line of its own
                    _stop(run, _where(run, global_step, epoch, batches_done))
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
            state = _where(run, global_step, epoch, batches_done)
            logs = {"loss/current": loss_window[-1], "loss/average": sum(loss_window[-100:]) / len(loss_window[-100:]),
                    "lr": float(run.prepared.lr_scheduler.get_last_lr()[0])}
            for callback in callbacks:
                logs.update(callback.after_optimizer_step(run, state))
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss/average']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            for callback in callbacks:
                callback.on_step_end(run, state, logs)
            if run.save.due_at_step(global_step) and global_step < plan.max_train_steps:
                _save(run, run.save.step_name(global_step), state, run.save.save_state)
                _prune(run, outdated_step_names(run.save, global_step, run.save.last_n_steps),
                       outdated_step_names(run.save, global_step, run.save.last_n_steps_state or run.save.last_n_steps))
            if global_step >= plan.max_train_steps:
                break
        if global_step < plan.max_train_steps or batches_done >= plan.batches_per_epoch_per_process:
            state = _where(run, global_step, epoch, batches_done)
            for callback in callbacks:
                callback.on_epoch_end(run, state)
            if run.save.due_at_epoch(epoch, plan.num_epochs):
                _save(run, run.save.epoch_name(epoch), state, run.save.save_state)
                _prune(run, outdated_epoch_names(run.save, epoch, run.save.last_n_epochs),
                       outdated_epoch_names(run.save, epoch, run.save.last_n_epochs_state or run.save.last_n_epochs))
    progress.close()
    final = _where(run, global_step, epoch, batches_done)
    _save(run, run.save.output_name, final, run.save.save_state or run.save.save_state_on_train_end)
    for callback in callbacks:
        callback.on_train_end(run, final)
    return final


def _save(run: TrainingRun, name: str, state: TrainState, with_state: bool) -> None:
    """A regular save point: the model, the --save_state folder when asked, then the callbacks hear of it."""
    model_path = save_model(run, name, state.global_step, state.epoch)
    folder = save_state(run, name, state) if with_state else None
    for callback in run.callbacks:
        callback.on_save(run, state, model_path, folder)


def _prune(run: TrainingRun, model_names: list[str], state_names: list[str]) -> None:
    if not run.accelerator.is_main_process:
        return
    remove_paths([run.save.model_path(n) for n in model_names] + [run.save.state_path(n) for n in state_names])


def _stop(run: TrainingRun, state: TrainState) -> None:
    """A NaN/inf loss: the callbacks (the NaN guard) save what helps and raise; else stop with a plain message."""
    for callback in run.callbacks:
        callback.on_nonfinite_loss(run, state)
    raise TrainingStopped(f"the loss became NaN/inf at step {state.global_step + 1} (epoch {state.epoch}); "
                          "start again with a lower --learning_rate")
