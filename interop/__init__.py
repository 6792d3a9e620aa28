"""Hugging Face interop (import, export, family maps), upcycling and `moeyard prepare`: offline tools, not on
the rank's import path (a rank imports `moeyard.interop` only to load weights that train.init_from names)."""
