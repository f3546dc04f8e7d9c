"""``DELETE /users/{user_id}``: the right to erasure over HTTP, off unless ``serve --allow-forget`` turns it on.

It runs :func:`data.forget.forget` on the served run (its catalog, its histories, both tombstone lists), then
reloads the served version at once, so the user is unknown (404) from the answer on. Off, it answers 403 and
names the switch and the CLI command: an open port must not let anyone erase data.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from data.forget import forget
from serve.live import LiveRecommender


def add_erasure(app: FastAPI, live: LiveRecommender, user_key, enabled: bool) -> None:
    """Register the route; ``user_key(served, raw_id)`` resolves an id as the other user routes do (404 when
    the served version does not know it)."""

    @app.delete("/users/{user_id:path}")
    def forget_user(user_id: str):
        if not enabled:
            raise HTTPException(403, "erasure over HTTP is off: start `towerrec serve --allow-forget`, or run "
                                     "`towerrec forget --run RUN --user ID`")
        served = live.current
        user = user_key(served, user_id)
        out = forget(live.run.path, user)
        live.check()  # the histories changed: serve without the user from now on
        return {"user_id": user, "catalog_interactions": out["catalog_interactions"],
                "history_rows": out["history_rows"], "version": live.current.name}
