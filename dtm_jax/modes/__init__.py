"""The modes: one module each, registered in dtm_jax/registry.py (checks, run, programs for --mode=compile)."""
