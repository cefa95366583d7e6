"""Per-layer sensitivity analysis: which layers a low width hurts (`ssql-deploy analyze`)."""
