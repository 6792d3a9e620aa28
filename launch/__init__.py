"""The `moeyard` command line, validation (once, in the launching process, before any rank starts), the
launchers (local, torchrun, Slurm, MPI) and the rank entry point (`python -P -m moeyard.launch.rank`).

Above everything else: the planner (`moeyard.plan`), the job schema (`moeyard.job`) and the per-rank run
(`moeyard.train`) live below it.
"""
