"""``python -m glm_experiments.scale.torchrun_loopback <torchrun arguments>``: torchrun whose rendezvous store listens
on 127.0.0.1 only, for single-node runs (glm_experiments/scale/launcher.py).

torchrun's static rendezvous creates its TCPStore server on every interface whatever ``--master_addr`` says,
so on a shared machine anyone on the network could join or write to the process group's store. Here the
server gets a socket already bound to 127.0.0.1 (``master_listen_fd``); everything else is torchrun's own.
"""

from __future__ import annotations

import socket

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import static_tcp_rendezvous
from torch.distributed.run import main

LOOPBACK = "127.0.0.1"
_listening: list[socket.socket] = []  # kept open for the life of the agent


def _loopback_store(host_name, port, world_size=None, is_master=False, *args, **kwargs):
    if is_master:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(128)
        _listening.append(sock)
        kwargs["master_listen_fd"] = sock.fileno()
    return dist.TCPStore(host_name, port, world_size, is_master, *args, **kwargs)


if __name__ == "__main__":
    static_tcp_rendezvous.TCPStore = _loopback_store
    main()
