"""Training: one engine (engine.py), pluggable objectives (objectives.py), typed settings (config.py)."""
