"""MoEyard's Hydra configuration tree, installed as the package `moeyard_conf`."""
