"""full SDXL fine-tuning (not implemented yet: this entry point lands with its issue)."""

import sys

if __name__ == "__main__":
    print("train_sdxl.py: full SDXL fine-tuning is not implemented yet", file=sys.stderr)
    sys.exit(2)
