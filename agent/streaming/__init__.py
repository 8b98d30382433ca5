"""The CRI streaming server's building blocks: the SPDY/3.1 framing codec
(`agent.streaming.spdy`) and, later, the HTTP/WebSocket server on top of it.
docs/streaming-protocols.md lists the Kubernetes protocol facts they follow."""
