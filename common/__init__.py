"""Code shared by the services, the simulator and the clients."""
