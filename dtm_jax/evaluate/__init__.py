"""Evaluation of pretrained students: linear probe, fine-tuning, kNN."""
