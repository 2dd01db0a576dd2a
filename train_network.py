"""LoRA/LoCon training (not implemented yet: this entry point lands with its issue)."""

import sys

if __name__ == "__main__":
    print("train_network.py: LoRA/LoCon training is not implemented yet", file=sys.stderr)
    sys.exit(2)
