"""Offline data preparation: ImageFolder -> .beton (`deit3-convert`), .beton reading and inspection."""
