"""Running the bridge as a service: locks, systemd notification, signals, logging.

The pieces ``bridge.service`` puts together around the target core and the transports;
each module does one job and knows nothing of SCSI.
"""
