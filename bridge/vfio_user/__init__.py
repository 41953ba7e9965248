"""vfio-user protocol server (sans-I/O codec plus a trio connection loop)."""
