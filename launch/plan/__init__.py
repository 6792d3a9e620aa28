"""`moeyard plan`: per-rank memory and step time of every parallel layout, predicted before a job starts.

cluster.py (the `cluster` config and the device tables), layouts.py (enumeration), memory.py (model state,
activations, buffers), timing.py (compute, communication, bubble, overlap), calibration.py (efficiencies from
benchmarks/gpu_check.py output or CPU runs), planner.py (ranking, the train pre-flight), command.py (the CLI),
measure.py (CPU validation against the real trainer), published.py (published layouts, checked on paper).
"""
