"""Network adapters that train_network.py attaches to a model, and the LoRA command-line tools.

  base.py     the adapter protocol: AdapterModule (one trainable update on one target) and AdapterNetwork
  plugin.py   kohya's plug-in API (create_network / create_network_from_weights) for any adapter kind
  lora.py     LoRA / LoCon, the ``--network_module networks.lora`` (kohya's import path)
  merge_lora.py, resize_lora.py, extract_lora_from_models.py, check_lora_weights.py: thin CLIs over
              library.adapters (targets, block settings, LoRA files, merge/resize/extract arithmetic)
"""
