"""The CRI streaming server behind the URLs of Exec, Attach and PortForward:
HTTP/1.1 (h11), SPDY/3.1 (`agent.streaming.spdy`, the only hand-written
framing) and WebSocket (wsproto), over a `StreamBackend`.
docs/streaming-protocols.md lists the Kubernetes protocol facts they follow."""
