"""MoEyard's Hydra configuration tree, installed as the package `moeyard.conf`."""
