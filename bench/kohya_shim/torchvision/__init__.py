"""A stand-in for torchvision, for bench/dataloader.py's kohya child only (not a package of this project).

kohya's train_util imports torchvision for ``transforms.Compose([ToTensor(), Normalize([0.5], [0.5])])``; the
torchvision wheels on PyPI are built against CUDA torch and fail to load next to a CPU torch ("operator
torchvision::nms does not exist"). This package does the same tensor operations torchvision does for a numpy
uint8 (H, W, C) image: from_numpy(transpose).contiguous().float().div(255), then clone().sub_(mean).div_(std).
Used only when the real torchvision cannot be imported; the bench says so in its output.
"""

BENCH_SHIM = True  # no __version__: transformers then treats torchvision as absent
