"""Development-only components: the local control plane and the local training-operator stand-in.

Nothing in this package is used by the Helm chart or the operator image's entry point.
"""
