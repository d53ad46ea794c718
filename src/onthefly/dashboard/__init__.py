"""The web dashboard behind `onthefly dashboard`: a page that shows a run and steers it.

`WebDashboard` (server.py) serves the page, its static files and one WebSocket with aiohttp,
on top of a client engine from onthefly.client; `PageHub` (hub.py) keeps the ordered history a
page replays; `PageSession` (page.py) serves one open page. The page itself (static/) is plain
HTML, CSS and JavaScript with uPlot bundled for the charts. This package needs the optional
`dashboard` extra (`pip install 'onthefly[dashboard]'`); nothing else in onthefly imports it.
"""

from __future__ import annotations

from .hub import CONNECTION_TYPE, PROCESS_EXIT_TYPE, PageHub
from .server import DEFAULT_HTTP_PORT, STATIC_DIR, WebDashboard, new_token

__all__ = [
    "WebDashboard",
    "PageHub",
    "DEFAULT_HTTP_PORT",
    "STATIC_DIR",
    "CONNECTION_TYPE",
    "PROCESS_EXIT_TYPE",
    "new_token",
]
