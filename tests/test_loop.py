"""The centre of the loop without a model: batch_loss with a stub trainee, the masked loss, the step plan, and
the order in which the loop calls its callbacks."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from library.data.datasets import Batch
from library.models.families import SD1
from library.training import noise as noise_lib
from library.training.checkpoints import SaveSettings
from library.training.loop import Callback, TrainingRun, TrainingStopped, batch_loss, make_plan, train

B, C, H, W = 2, 4, 2, 3


class StubTrainee:
    """predict(x_t) = scale * x_t, recording what the loop hands it."""

    trains_text_encoder = False

    def __init__(self, scale: float = 0.5, perturb: tuple[int, int] | None = None) -> None:
        self.scale = scale
        self.perturb = perturb  # (h, w): add 1 to the prediction at this latent pixel only
        self.calls: list[dict[str, object]] = []

    def predict(self, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs, batch):
        self.calls.append({"noisy": noisy_latents.dtype, "timesteps": timesteps.dtype,
                           "hidden": encoder_hidden_states.dtype, "added": added_cond_kwargs})
        prediction = noisy_latents * self.scale
        if self.perturb is not None:
            prediction = prediction.clone()
            prediction[:, :, self.perturb[0], self.perturb[1]] += 1
        return prediction


def _run(trainee: StubTrainee, *, alphas_cumprod: torch.Tensor, masked: bool = False,
         weight_dtype: torch.dtype = torch.float32, prior_loss_weight: float = 0.25) -> TrainingRun:
    accelerator = SimpleNamespace(device=torch.device("cpu"), process_index=0, autocast=contextlib.nullcontext)
    prepared = SimpleNamespace(uses_deepspeed=False)
    return TrainingRun(
        accelerator=accelerator, trainee=trainee, vae=None, latent_scaling_factor=0.5, prompt_encoder=None,
        family=SD1, dataloader=None, batch_sampler=None, prepared=prepared, plan=None, seed=0,
        prediction_type="epsilon", alphas_cumprod=alphas_cumprod, noise_options=noise_lib.NoiseOptions(),
        loss_options=noise_lib.LossOptions(masked_loss=masked), save=None, prior_loss_weight=prior_loss_weight,
        weight_dtype=weight_dtype)


def _batch(alpha_masks: torch.Tensor | None = None) -> Batch:
    """Cached latents and text: no VAE, no text encoder. The second sample is a regularisation image."""
    latents = torch.arange(B * C * H * W, dtype=torch.float32).reshape(B, C, H, W) / 10
    sizes = torch.tensor([[16, 24]] * B)
    return Batch(captions=["a", "b"], image_paths=["a.png", "b.png"], original_sizes_hw=sizes,
                 crop_top_lefts=torch.zeros(B, 2, dtype=torch.long), target_sizes_hw=sizes,
                 flipped=torch.zeros(B, dtype=torch.bool), is_reg=torch.tensor([False, True]), latents=latents,
                 alpha_masks=alpha_masks, text_hidden_states=torch.ones(B, 77, 8))


def test_batch_loss_is_the_hand_computed_weighted_mse():
    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)
    timesteps = torch.tensor([100, 700])
    run = _run(StubTrainee(scale=0.5), alphas_cumprod=alphas_cumprod)
    loss = batch_loss(run, _batch(), torch.Generator().manual_seed(7), timesteps=timesteps)

    # The same draws in the same order: the global seed for dropout, then the noise (timesteps were given).
    replay = torch.Generator().manual_seed(7)
    torch.randint(0, 2**62, (1,), generator=replay)
    noise = torch.randn((B, C, H, W), generator=replay)
    x0 = _batch().latents * 0.5  # the VAE scaling factor
    expected = 0.0
    for i, (t, weight) in enumerate(zip(timesteps.tolist(), [1.0, 0.25])):  # prior_loss_weight for the reg image
        ab = float(alphas_cumprod[t])
        noisy = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        expected += weight * float(((0.5 * noisy - noise[i]) ** 2).mean()) / B  # epsilon target, mean over batch
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_predict_gets_every_input_in_the_weight_dtype():
    trainee = StubTrainee()
    batch_loss(_run(trainee, alphas_cumprod=torch.linspace(0.99, 0.01, 1000), weight_dtype=torch.float16), _batch(),
               torch.Generator().manual_seed(0))
    assert trainee.calls == [{"noisy": torch.float16, "timesteps": torch.long, "hidden": torch.float16, "added": None}]


def test_masked_loss_differs_from_unmasked_exactly_where_the_mask_is_zero():
    """At alpha_cumprod 0 the noisy input is the noise itself, so predicting the input is a perfect prediction;
    an error at one latent pixel is then seen by the masked loss only where the mask is not 0."""
    mask = torch.ones(B, H, W)
    mask[:, 0, 1] = 0
    mask[:, 1, 2] = 0
    zero = torch.zeros(1000)
    losses = {}
    for h in range(H):
        for w in range(W):
            for masked in (False, True):
                run = _run(StubTrainee(scale=1.0, perturb=(h, w)), alphas_cumprod=zero, masked=masked)
                batch = _batch(alpha_masks=mask if masked else None)
                losses[h, w, masked] = batch_loss(run, batch, torch.Generator().manual_seed(3)).item()
    for (h, w, masked), value in losses.items():
        unmasked = losses[h, w, False]
        assert unmasked == pytest.approx((1.0 + 0.25) / 2 / (H * W))  # one pixel of H*W, all channels, off by 1
        if masked:
            assert value == (0.0 if mask[0, h, w] == 0 else pytest.approx(unmasked)), (h, w)


def test_plan_steps_per_epoch_round_up_and_steps_give_the_epochs():
    plan = make_plan(num_images=10, num_reg_images=0, samples_per_epoch=10, batch_size=1,
                     batches_per_epoch_per_process=10, gradient_accumulation_steps=3, num_processes=2,
                     max_train_steps=9, max_train_epochs=None)
    assert (plan.steps_per_epoch, plan.max_train_steps, plan.num_epochs) == (4, 9, 3)  # ceil(10/3), ceil(9/4)
    assert plan.global_batch == 1 * 3 * 2
    assert "optimizer steps: 4 per epoch, 9 in total over 3 epoch(s)" in plan.format()
    assert "global batch: 1 per device x 3 accumulation x 2 process(es) = 6" in plan.format()


def test_plan_epochs_win_over_steps_as_in_kohya():
    plan = make_plan(num_images=4, num_reg_images=2, samples_per_epoch=8, batch_size=2,
                     batches_per_epoch_per_process=4, gradient_accumulation_steps=1, num_processes=1,
                     max_train_steps=1000, max_train_epochs=3, short_batches=1, repeated_batches=2)
    assert (plan.steps_per_epoch, plan.max_train_steps, plan.num_epochs) == (4, 12, 3)
    assert "(1 short last-of-bucket batches kept, 2 repeated to even out ranks)" in plan.format()
    assert "images: 4 train + 2 regularisation -> 8 samples per epoch" in plan.format()


def test_plan_has_at_least_one_step_per_epoch_and_needs_a_length():
    plan = make_plan(num_images=1, num_reg_images=0, samples_per_epoch=1, batch_size=1,
                     batches_per_epoch_per_process=1, gradient_accumulation_steps=4, num_processes=1,
                     max_train_steps=3, max_train_epochs=None)
    assert (plan.steps_per_epoch, plan.num_epochs) == (1, 3)
    with pytest.raises(ValueError, match="max_train_steps or --max_train_epochs"):
        make_plan(num_images=1, num_reg_images=0, samples_per_epoch=1, batch_size=1,
                  batches_per_epoch_per_process=1, gradient_accumulation_steps=1, num_processes=1,
                  max_train_steps=None, max_train_epochs=None)


class LoopAccelerator:
    """One process, no accumulation; records what is logged."""

    device = torch.device("cpu")
    process_index, num_processes = 0, 1
    is_main_process = is_local_main_process = sync_gradients = True
    distributed_type = DistributedType.NO  # nothing sharded: saves gather nothing

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def accumulate(self, *models):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, tensor, reduction):
        return tensor

    def log(self, logs, step):
        self.logged.append((step, dict(logs)))

    def wait_for_everyone(self) -> None:
        pass


class SavingTrainee(StubTrainee):
    def __init__(self, nan_at_call: int | None = None) -> None:
        super().__init__()
        self.nan_at_call = nan_at_call

    def predict(self, *args):
        prediction = super().predict(*args)
        return prediction * float("nan") if len(self.calls) == self.nan_at_call else prediction

    def set_train(self, training: bool) -> None:
        pass

    def evaluation_weights(self):
        return contextlib.nullcontext()

    def trainable_modules(self):
        return {}  # nothing to gather before a save

    def save(self, path, step, epoch) -> None:
        path.write_text(f"{step} {epoch}")


class Recorder(Callback):
    """Every hook call in order, and one scalar logged with each step."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_train_start(self, run, state):
        self.events.append(("start", state.global_step))

    def after_optimizer_step(self, run, state):
        self.events.append(("stepped", state.global_step))
        return {"extra": float(state.global_step)}

    def on_step_end(self, run, state, logs):
        self.events.append(("step end", state.global_step, sorted(logs)))

    def on_epoch_end(self, run, state):
        self.events.append(("epoch end", state.global_step, state.epoch))

    def on_save(self, run, state, model_path, state_folder):
        self.events.append(("saved", state.global_step, model_path.name, state_folder))

    def on_nonfinite_loss(self, run, state):
        self.events.append(("nan", state.global_step, state.epoch))

    def on_train_end(self, run, state):
        self.events.append(("end", state.global_step))


def _loop_run(tmp_path, trainee: SavingTrainee, callbacks, max_train_steps: int = 5) -> TrainingRun:
    plan = make_plan(num_images=3, num_reg_images=0, samples_per_epoch=3, batch_size=2,
                     batches_per_epoch_per_process=3, gradient_accumulation_steps=1, num_processes=1,
                     max_train_steps=max_train_steps, max_train_epochs=None)
    optimizer = SimpleNamespace(step=lambda: None, zero_grad=lambda set_to_none: None)
    scheduler = SimpleNamespace(step=lambda: None, get_last_lr=lambda: [1e-3])
    prepared = SimpleNamespace(models={}, optimizer=optimizer, lr_scheduler=scheduler, uses_deepspeed=False,
                               backward=lambda loss: None, clip_grad_norm=lambda max_norm: None)
    sampler = SimpleNamespace(set_epoch=lambda epoch, first_step: None, load_state_dict=lambda state: None)
    return TrainingRun(
        accelerator=LoopAccelerator(), trainee=trainee, vae=None, latent_scaling_factor=1.0, prompt_encoder=None,
        family=SD1, dataloader=[_batch()] * 3, batch_sampler=sampler, prepared=prepared, plan=plan, seed=0,
        prediction_type="epsilon", alphas_cumprod=torch.linspace(0.99, 0.01, 1000),
        noise_options=noise_lib.NoiseOptions(), loss_options=noise_lib.LossOptions(),
        save=SaveSettings(tmp_path, "m", ".txt", every_n_steps=2), callbacks=callbacks)


def test_callbacks_hear_each_step_epoch_and_save_in_order(tmp_path):
    recorder = Recorder()
    run = _loop_run(tmp_path, SavingTrainee(), [recorder])
    final = train(run)
    logs = ["extra", "loss/average", "loss/current", "lr"]
    step = lambda n: [("stepped", n), ("step end", n, logs)]  # noqa: E731
    assert recorder.events == [
        ("start", 0), *step(1), *step(2), ("saved", 2, "m-step00000002.txt", None), *step(3), ("epoch end", 3, 1),
        *step(4), ("saved", 4, "m-step00000004.txt", None), *step(5), ("saved", 5, "m.txt", None), ("end", 5)]
    assert (final.global_step, final.epoch, final.batches_done_in_epoch) == (5, 2, 2)
    assert [step for step, _ in run.accelerator.logged] == [1, 2, 3, 4, 5]
    assert run.accelerator.logged[2][1]["extra"] == 3.0  # what after_optimizer_step returned is logged
    assert (tmp_path / "m.txt").read_text() == "5 2"


def test_a_nonfinite_loss_goes_to_the_callbacks_before_the_step(tmp_path):
    recorder = Recorder()
    with pytest.raises(TrainingStopped, match="NaN/inf at step 3 \\(epoch 1\\)"):
        train(_loop_run(tmp_path, SavingTrainee(nan_at_call=3), [recorder]))
    assert recorder.events[-2:] == [("saved", 2, "m-step00000002.txt", None), ("nan", 2, 1)]
    assert not (tmp_path / "m.txt").exists()  # no final save
