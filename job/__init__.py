"""The job schema: what one `moeyard train` job is (JobConfig, LauncherConfig, ClusterConfig), the
user-facing ConfigError, and the layout rules. Below both the planner and `launch`."""
