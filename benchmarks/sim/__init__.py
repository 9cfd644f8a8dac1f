"""Discrete-event simulation of the serving stack: cost model and workloads (see COST_MODEL.md)."""
