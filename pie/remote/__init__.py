"""Model workers in other processes: the wire format, the daemon-side RemoteWorker, `pie worker`."""
