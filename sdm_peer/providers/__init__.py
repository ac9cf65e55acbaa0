"""Where groups of workers come from (DESIGN §6): base.py holds the Provider protocol and the
registry; local.py runs workers on this machine; gce/ holds everything Compute Engine."""
