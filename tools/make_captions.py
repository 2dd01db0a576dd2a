"""Caption a folder of images with BLIP (kohya's finetune/make_captions.py, same flags).

    python tools/make_captions.py train_data_dir --batch_size 8 --beam_search --num_beams 3
    python tools/make_captions.py train_data_dir --model_id path/to/any/image-to-text/model --recursive

Writes `<image stem>.caption` (--caption_extension) per image; an existing caption file is kept unless
--overwrite. The model is any transformers image-to-text model (hub id or local folder); the default is
Salesforce/blip-image-captioning-large (the transformers release of the BLIP-large captioner kohya loads as
a .pth). Captions continue kohya's prompt "a picture of " (--prompt), which is cut from the caption. By
default captions are sampled (nucleus, --top_p, reproducible with --seed); --beam_search decodes
deterministically with --num_beams.
--max_length / --min_length bound the caption in tokens; --generate_kwargs passes more generate() options.
"""

from __future__ import annotations

import sys

from library.cli.caption_args import BLIP, caption_main


def main(argv: list[str] | None = None) -> int:
    return caption_main(argv, __doc__, BLIP)


if __name__ == "__main__":
    sys.exit(main())
