"""Throughput and MFU metering, step breakdown, traces, expert-load tracking, metric sinks and the dashboard."""
