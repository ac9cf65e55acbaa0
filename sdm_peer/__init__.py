"""sdm-peer: run a big grid of experiments on preemptible VMs with leases, without a master daemon."""

__version__ = "0.1.0"
