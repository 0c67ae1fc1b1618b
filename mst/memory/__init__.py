"""Memory engine: checkpoint offload, optimizer-in-backward, measurement and the planner."""
