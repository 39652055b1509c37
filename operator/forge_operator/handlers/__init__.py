"""Handler logic, one module per handler; ``forge_operator.main`` only registers them with kopf."""
