"""Latent and text-encoder caches on disk: storage formats and filling them."""
