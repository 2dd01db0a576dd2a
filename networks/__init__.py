"""Network modules (LoRA and friends) that train_network.py attaches to a model."""
