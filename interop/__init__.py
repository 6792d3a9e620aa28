"""Hugging Face interop and `moeyard prepare`: offline tools, not on the rank's import path.

hf.py (import, export, safetensors reads and streaming writes), hf_families.py (each family's names and
refusals), upcycle.py (a dense Llama/Qwen3 into an MoE), weights.py (the weight loader handed to the Trainer),
prepare.py (tokenization into token files), generate.py and evaluate.py (`moeyard generate` and `moeyard eval`:
a checkpoint or HF directory in one process). A rank imports `moeyard.interop` only to load the weights that
train.init_from names.
"""
