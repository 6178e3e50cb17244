"""What keeps workers running: the daemon, the fleet, the worker API, external workers
(their process, protocol and sandbox), leases between hosts, recovery and checkpoints."""
