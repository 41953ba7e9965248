"""vfio-user protocol server (sans-I/O codec plus a trio connection loop).

- protocol.py: wire format (header, payload structs) and MessageDecoder, which
  splits the unix stream into messages and pairs SCM_RIGHTS fds with them.
- dma.py: DmaSpaceImpl, the client's DMA maps (mmap'd memfds; fd-less maps
  reached through DMA_READ/DMA_WRITE).
- session.py: Session, one client's command handling against a VfioUserDevice.
- budget.py: what one connection may hold (fds, DMA maps, bytes mapped),
  derived from RLIMIT_NOFILE.
- fds.py: vetting client fds (DMA memory: shrink-sealed memfds; IRQs: eventfds).
- server.py: ``serve(socket_path, device)``, the trio socket loop.
- device.py: the device-model protocol a PCI device implements.

Usage::

    await nursery.start(bridge.vfio_user.server.serve, "/run/x.sock", device)
"""
