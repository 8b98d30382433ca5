"""How a remote command ended, as the error stream tells it: a
``metav1.Status`` JSON document (v4 and later) or plain text (older
protocols, nothing on success). docs/streaming-protocols.md has the shapes."""

from __future__ import annotations

import json
from typing import Any

from agent.streaming.backend import ExitStatus


def status_json(result: ExitStatus) -> bytes:
    doc: dict[str, Any] = {"metadata": {}}
    if result.code == 0 and not result.message:
        doc["status"] = "Success"
    elif result.message:
        doc.update(status="Failure", message=result.message, reason="InternalError", code=500)
    else:
        doc.update(
            status="Failure",
            message=f"command terminated with non-zero exit code: exit status {result.code}",
            reason="NonZeroExitCode",
            details={"causes": [{"reason": "ExitCode", "message": str(result.code)}]},
        )
    return json.dumps(doc, separators=(",", ":")).encode()


def status_text(result: ExitStatus) -> bytes:
    if result.message:
        return result.message.encode()
    if result.code:
        return f"command terminated with non-zero exit code: exit status {result.code}".encode()
    return b""
