"""Distribution strategies of the preconditioner engine (one module per strategy family)."""
