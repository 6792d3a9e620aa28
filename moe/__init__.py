"""Single-device Mixture-of-Experts model code: router, dispatcher protocol, experts, layers, model.

Nothing here imports torch.distributed: communication enters only through the dispatcher object that
`parallel/` injects into each MoE layer.
"""
