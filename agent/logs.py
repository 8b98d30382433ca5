"""structlog set-up: human-readable on a terminal, JSON lines otherwise.

Tracebacks never show frame locals, in either format: frames of a pull hold
the pull's credentials (CRI's ``AuthConfig``), and no secret may reach a log
line.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def exception_processor() -> structlog.types.Processor:
    """``exc_info`` → a structured traceback without locals (JSON logs)."""
    return structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


def console_renderer() -> structlog.dev.ConsoleRenderer:
    """The terminal renderer, with plain tracebacks (rich's would show locals)."""
    return structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Route structlog (and stdlib logging, e.g. grpc's) to stderr.

    ``fmt`` is "console", "json" or "auto" (console when stderr is a tty).
    """
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if use_console:
        renderer = console_renderer()
    else:
        shared.append(exception_processor())
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # grpc and other libraries log through the standard library.
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
