"""``python -m forge_operator``: the same as the ``forge-operator`` command."""

from forge_operator.main import run

run()
