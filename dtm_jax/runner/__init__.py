"""How every mode runs: the run wrapper (run.py), the one training loop (loop.py) and the one resume (resume.py)."""
