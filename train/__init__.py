"""The per-rank run: training loop, optimizer and schedule, data, checkpoint policy, step guard, callbacks."""
