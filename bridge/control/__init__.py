"""The run-time control plane: a JSON-RPC 2.0 socket into a running bridge, its Python
client, the CLI subcommands that use it, and a pytest plugin.

- ``server.serve_control``: the unix-socket server (newline-delimited JSON-RPC 2.0).
- ``methods.METHODS``: the method table (name -> handler, parameter schema, help).
- ``host.AttachmentHost``: what the composition root (bridge/cli.py serve) implements so
  that attachments (transports) are created and removed without this package
  importing a transport.
- ``client.ControlClient`` (trio) and ``client.BlockingControlClient``.
- ``cli.register``: the ``lu``, ``lun``, ``attach``, ``status``, ``stats``, ``pr``,
  ``log-level`` and ``save-config`` subcommands.
- ``pytest_plugin``: the ``vscsi_bridge`` fixture (entry point ``pytest11``).
"""
