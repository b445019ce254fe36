"""Free TCP ports on 127.0.0.1, for tests that start torch.distributed ranks themselves."""
import socket


def free_ports(n: int) -> list[int]:
    """n distinct ports, all bound at once so that none is handed out twice."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
