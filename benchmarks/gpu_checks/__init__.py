"""The parts of benchmarks/gpu_check.py: training runs of the real Trainer (runs.py) and the first-contact checks
of the installed torch on this device (contact.py). Imported by the script, whose folder is sys.path[0]."""
