"""The operator console: approvals, kill switch, trends and repair in a browser.

`acp-supervisor console` serves it as its own process over the store; with `[console]
enabled = true` the daemon serves it too. The web parts (Starlette, uvicorn, Jinja2) are the
optional extra `acp-supervisor[console]` and are imported only when the console is served;
`settings` and `auth` use the standard library alone.
"""
