"""Set-up, the loop, diffusion noise/targets and losses, optimizers, EMA, checkpoints, validation, sampling, the Accelerator."""
