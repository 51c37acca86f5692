"""Training: one engine in parts (loop.py, objective.py, checkpoint.py, distributed.py), the
objectives that plug into it (objectives.py, contrastive.py) and typed settings (config.py)."""
