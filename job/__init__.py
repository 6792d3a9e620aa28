"""The job schema: what one `moeyard train` job is, below both the planner and `launch`.

schema.py (JobConfig, LauncherConfig with its world size and ranks per node, ClusterConfig, the user-facing
ConfigError), layout.py (the layout rules, `check_layout`), compose.py (Hydra composition and the
resolved config file every rank reads), presets.py (moe/presets.py's model presets and routing recipes as the
`model` and `moe` config-group options).
"""
