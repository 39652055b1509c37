"""Forge trainer: the program the PyTorchJob pods run."""
