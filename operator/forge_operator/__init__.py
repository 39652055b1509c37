"""Forge operator: reconciles ForgeJob resources into Kubeflow PyTorchJobs."""
