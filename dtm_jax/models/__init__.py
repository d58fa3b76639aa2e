"""Student ViT (BEiT-style), CLIP vision tower and checkpoint converters."""
