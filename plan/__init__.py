"""`moeyard plan`: per-rank memory and step time of every parallel layout, predicted before a job starts.

cluster.py (the device table, resolving `cluster.*`), activations.py and memory.py (model state,
activations, buffers), timing.py (compute, communication, bubble, overlap), calibration.py (the efficiency
table), cpu.py (a CPU rank's rates and the calibration fit), planner.py (one layout's prediction, calibration
files, the train pre-flight), layouts.py (enumeration), ranking.py (the order and the recommendation),
command.py (the CLI), measure.py and validation.py (the real trainer measured on CPU), published.py
(published layouts, checked on paper).
The calibration, the pre-flight and the measurement harness are separate modules; measure.py, validation.py
and published.py are not on the train path (`moeyard train` does not import them). docs/planner.md is the guide.
"""
