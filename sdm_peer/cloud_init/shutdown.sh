#!/bin/sh
# The `shutdown-script` of every worker VM: when the VM stops (a spot preemption included),
# give this worker's leases back at once instead of letting them lapse.
/opt/sdm-peer/venv/bin/sdm-peer release --from-metadata --reason "VM shutting down (preempted or deleted)"
