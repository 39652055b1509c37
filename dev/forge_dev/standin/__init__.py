"""Local stand-in for Kubeflow's training-operator + kubelet (development and tests only, never deployed).

It watches PyTorchJobs in a (local) API server, runs each replica's ``pytorch`` container command as a local
process with the environment Kubeflow injects, and writes the PyTorchJob status as the training-operator does.
See docs/standin.md.
"""

from forge_dev.standin.controller import StandInSettings, TrainingOperatorStandIn, standin_thread

__all__ = ["StandInSettings", "TrainingOperatorStandIn", "standin_thread"]
