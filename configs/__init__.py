"""Run configs: one get_config(arg) per recipe; each docstring gives its command and expected result."""
