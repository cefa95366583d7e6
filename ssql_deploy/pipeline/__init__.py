"""`ssql-deploy run`: a pipeline recipe checked whole (plan.py), then run stage by stage (runner.py)."""
