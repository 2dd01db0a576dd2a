"""End-to-end demo on an embedded tiny SDXL model: no download, a few seconds on a CPU.

    python tools/demo.py [--output_dir demo_output]

Builds the tiny model, writes it as an A1111/ComfyUI-style single file and reads it back, encodes a long
(>75 token) prompt the A1111 way, and samples a 64 px image through diffusers with those embeddings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers warns at import that torchvision is absent; nothing here needs it.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.models import load_model, save_single_file  # noqa: E402
from library.text_encoding import PromptEncoder  # noqa: E402
from library.tiny_models import make_tiny_model  # noqa: E402

LONG_PROMPT = (
    "a watercolor painting of a lighthouse on a rocky island at dawn, soft pink and orange sky, gentle waves, "
    "seagulls circling the tower, a small wooden boat moored at the pier, fishermen mending nets, morning mist "
    "over the water, distant mountains, pine trees on the cliffs, warm light through the lantern room, "
    "highly detailed, muted palette, textured paper, loose brush strokes, wet-on-wet washes, granulating pigments, "
    "a flock of birds above the horizon, reflections of the lighthouse shimmering on the calm sea, an old stone "
    "wall along the path, wildflowers between the rocks"
)


def fresh_dir(base: Path) -> Path:
    """Never write into a folder that already has files: use base, base-2, base-3, ..."""
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    args = parser.parse_args(argv)
    out = fresh_dir(Path(args.output_dir))
    t0 = time.perf_counter()

    folder = make_tiny_model("sdxl", out / "tiny_sdxl", seed=0)
    print(f"[1/4] tiny SDXL diffusers folder: {folder} ({time.perf_counter() - t0:.1f} s)")

    single = out / "tiny_sdxl.safetensors"
    save_single_file(load_model(folder), single)
    model = load_model(single)
    reference = load_model(folder)
    same = all(torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(), reference.unet.state_dict().values()))
    print(f"[2/4] single-file checkpoint (LDM layout): {single}; reloaded UNet identical: {same}")

    encoder = PromptEncoder("sdxl", model.tokenizers, model.text_encoders, max_token_length=225)
    tokens = model.tokenizers[0](LONG_PROMPT, verbose=False).input_ids
    with torch.no_grad():
        encoded = encoder.encode([LONG_PROMPT])
        negative = encoder.encode([""])
    chunks = encoder.tokenize([LONG_PROMPT])[0].shape[1]
    print(f"[3/4] prompt of {len(tokens) - 2} tokens -> {chunks} chunks of 77 -> hidden states {tuple(encoded.hidden_states.shape)}, "
          f"pooled {tuple(encoded.pooled.shape)}")

    pipe = model.to_pipeline()
    generator = torch.Generator().manual_seed(0)
    image = pipe(prompt_embeds=encoded.hidden_states, pooled_prompt_embeds=encoded.pooled,
                 negative_prompt_embeds=negative.hidden_states, negative_pooled_prompt_embeds=negative.pooled,
                 height=64, width=64, num_inference_steps=2, generator=generator).images[0]
    image_path = out / "sample.png"
    image.save(image_path)
    print(f"[4/4] sampled {image.size[0]}x{image.size[1]} image with the long-prompt embeddings: {image_path}")
    print(f"done in {time.perf_counter() - t0:.1f} s; outputs in {out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
