"""Pod networking, the pure part: CNI configurations, results and the choice
between them, the VM's wiring plan and its DHCP server's arguments.

The I/O that carries these plans out is in ``agent/adapters/network/``.
"""
