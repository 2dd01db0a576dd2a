"""Model families, loading and saving (diffusers folders, single files), ControlNet, tokenizer, text encoding, tiny models."""
