"""The sans-IO scheduling core: no sockets, threads or clocks.

The gRPC scheduler and the simulator drive the same objects: they feed events in
(arrivals, step results, swap completions) and carry out the `StepPlan`s that come out.
"""
