"""Caption a folder of images with GIT (kohya's finetune/make_captions_by_git.py, same flags).

    python tools/make_captions_by_git.py train_data_dir --batch_size 8 --remove_words
    python tools/make_captions_by_git.py train_data_dir --model_id microsoft/git-large-coco --beam_search --num_beams 3

Writes `<image stem>.caption` (--caption_extension) per image; an existing caption file is kept unless
--overwrite. The model is any transformers image-to-text model (hub id or local folder); the default is
microsoft/git-large-textcaps, as in kohya. Captions are decoded greedily (kohya's behaviour); --beam_search
uses --num_beams, --top_p samples (reproducible with --seed). --remove_words cuts the text GIT imagines in
images ("with the words ... on it"). --max_length / --min_length bound the caption in tokens.
"""

from __future__ import annotations

import sys

from library.cli.caption_args import GIT, caption_main


def main(argv: list[str] | None = None) -> int:
    return caption_main(argv, __doc__, GIT)


if __name__ == "__main__":
    sys.exit(main())
