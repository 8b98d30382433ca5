"""Pod networking, the I/O: namespaces, links, the DHCP server, firewall
rules, CNI plugin execution, and the front the services call
(``pod_network.PodNetworkManager``). The plans they carry out are made in
``agent/domain/network/``.
"""
