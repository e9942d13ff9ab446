"""The Gradio app: Predict | Train | Study | Models | Compare — a thin shell over the library.

One module per tab (``predict``, ``train``, ``study``, ``models``, ``compare``); each holds the tab's
handlers — plain functions taking a ``Services`` first, testable without a server — and a ``build``
that lays the tab out and binds the handlers. ``services`` holds ``Settings``/``Services``, ``common``
the one error path (``user_errors``), choice lists and option inputs generated from the registry and
``TrainConfig``, and the formatting; ``app`` composes the tabs.

Nothing heavy happens at import: torch loads when ``build_app()`` reads the registry, models on first use
(then cached). Training runs in a worker process (``jobs.py``).

Settings (environment):
  COVID_CLS_CHECKPOINTS  checkpoint folder (default ``checkpoints``)
  COVID_CLS_RUNS         run history, uploaded datasets, demo data (default ``runs``)
  COVID_CLS_DATA_ROOTS   folders the Train tab may read, separated by ``:`` (default: the demo data only)
  COVID_CLS_TRAINING     ``0`` switches training off (public deployments)
  COVID_CLS_MAX_UPLOAD_MB upload limit (default 50)
  COVID_CLS_MAX_SESSIONS sessions whose state is kept (default 1000; the least recently used go first)
  COVID_CLS_UPLOADS_MAX_MB, COVID_CLS_UPLOADS_MAX_AGE_HOURS  extracted dataset uploads (default 2048 MB, 24 h)
  COVID_CLS_CACHE_MAX_MB, COVID_CLS_CACHE_MAX_AGE_DAYS, COVID_CLS_CACHE_MEMORY_MB  decoded image caches (default
                         4096 MB and 14 days on disk, 2048 MB in a process's memory)
  COVID_CLS_HUB_MODELS   Hub repos (user/name[@rev]) or local snapshot folders pulled at start-up, ``,``-separated
  COVID_CLS_MCP          ``1`` also serves Gradio's MCP server (needs ``pip install "gradio[mcp]"``)
  COVID_CLS_PERSISTENT_DIR  Spaces' persistent storage (default ``/data``, used when writable; ``""`` = never)
"""

from __future__ import annotations

from .app import build_app, launch
from .common import CSS, DISCLAIMER, user_errors
from .services import Services, Settings

__all__ = ["build_app", "launch", "Settings", "Services", "CSS", "DISCLAIMER", "user_errors"]
