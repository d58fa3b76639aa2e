"""Evaluation algorithms the modes share: frozen features, kNN, the linear probe, accuracy and segmentation scores."""
