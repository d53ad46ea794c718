"""Run identity: names, manifests (`run.json`), transitions between runs, and `list_runs`.

Fork and merge build on `start_new_run`; see docs/runs.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..control.router import CommandRouter
from ..session.schemas import Empty
from ..session.storage import safe_component, write_json_atomic


class RunManagementMixin:
    """Names runs, records them in `run.json`, and switches the session from one run to the next."""

    def _init_run_management(self) -> None:
        self.initial_run_name = self.cfg.run_name
        self.counters = {"fork": _env_int("ONTHEFLY_FORK_COUNTER_INIT"), "merge": _env_int("ONTHEFLY_MERGE_COUNTER_INIT")}
        self._manifests: dict[str, dict[str, Any]] = {}
        # Manifest files are written (with fsync) off the training thread, in order; readers use
        # the in-memory copy, so they never wait for the disk either.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onthefly-io")
        self._io_pending: Future | None = None

    def store_manifest(self, run_id: str, manifest: dict[str, Any]) -> None:
        """Keep `manifest` as the run's current one and write `run.json` in the background."""
        self._manifests[run_id] = manifest
        text = json.dumps(manifest, indent=2, default=str)
        self._io_pending = self._io.submit(write_json_atomic, self.manifest_path(run_id), text)

    def flush_manifests(self, timeout: float | None = 60.0) -> None:
        """Wait until every manifest handed to `store_manifest` is on disk (raises a write error)."""
        pending = self._io_pending
        if pending is not None:
            pending.result(timeout)

    def close_run_management(self) -> None:
        self._io.shutdown(wait=True)
        if self._io_pending is not None and self._io_pending.exception() is not None:
            self.log(f"could not write a run manifest: {self._io_pending.exception()}", level="error")

    # ---- names -------------------------------------------------------------------------------
    def known_runs(self) -> list[str]:
        return sorted(set(self._manifests) | set(self.storage.run_ids()))

    def unique_run_name(self, wanted: str, *, dedupe: bool = True) -> str:
        """`wanted` made file-system safe, with `-2`, `-3`, ... appended while it is taken."""
        base = safe_component(wanted)
        if not dedupe:
            return base
        taken = set(self.known_runs())
        if base not in taken:
            return base
        n = 2
        while f"{base}-{n}" in taken:
            n += 1
        return f"{base}-{n}"

    def next_run_name(self, kind: str) -> str:
        """`fork<N>` / `merge<N>`: the counter (seeded from the dashboard or env) never reuses a name."""
        taken = set(self.known_runs())
        pattern = re.compile(rf"^{kind}(\d+)$")
        highest = max((int(m.group(1)) for r in taken if (m := pattern.match(r))), default=0)
        n = max(self.counters.get(kind, 0), highest) + 1
        self.counters[kind] = n
        return f"{kind}{n}"

    # ---- manifests ---------------------------------------------------------------------------
    def manifest_path(self, run_id: str) -> Path:
        return self.storage.run_dir(run_id) / "run.json"

    def read_manifest(self, run_id: str) -> dict[str, Any] | None:
        if run_id in self._manifests:
            return self._manifests[run_id]
        path = self.manifest_path(run_id)
        if path.is_file():
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        return None

    def update_run_manifest(self, run_id: str | None = None, **changes: Any) -> None:
        run_id = run_id or self.cfg.run_name
        manifest = self._manifests.get(run_id) or self.read_manifest(run_id)
        if manifest is None:
            return
        manifest.update(changes)
        manifest["updated"] = time.time()
        self.store_manifest(run_id, manifest)

    def emit_new_run(self, run_id: str, *, parents: list[str], meta: dict[str, Any],
                     hparams: dict[str, Any] | None = None) -> None:
        """Record a run (`run.json`) and announce it with `newRun`."""
        manifest = {
            "run_id": run_id,
            "display_name": run_id,
            "project": self.cfg.project,
            "session_id": self.session_id,
            "parents": list(parents),
            "kind": meta.get("kind", "root"),
            "meta": meta,
            "hparams": hparams or {},
            "status": "running",
            "created": time.time(),
        }
        self.store_manifest(run_id, manifest)
        self.emit("newRun", run_id=run_id, parents=list(parents),
                  meta={**meta, "display_name": run_id, "run_gen": self.run_gen},
                  project=self.cfg.project, run_name=run_id)

    def start_new_run(self, run_id: str, *, parents: list[str], meta: dict[str, Any],
                      hparams: dict[str, Any] | None = None, transition: bool = True,
                      emit_new_run: bool = True) -> None:
        """Switch the session to a new run: close the old one, re-stamp events, reset counters."""
        previous, prev_step = self.cfg.run_name, self.state.step
        if transition:
            self.emit("runTransition", **{"from": previous, "to": run_id, "prev_step": prev_step})
            self.emit("finalizeRun", run_id=previous, next_run=run_id, last_step=prev_step)
        self.update_run_manifest(previous, status="finished" if transition else "reset", last_step=prev_step)
        self.run_gen += 1
        self.cfg.run_name = run_id
        self._update_event_context()
        self._last_saved = None
        if emit_new_run:
            self.emit_new_run(run_id, parents=parents, meta=meta, hparams=hparams)
        else:
            manifest = {
                "run_id": run_id, "display_name": run_id, "project": self.cfg.project,
                "session_id": self.session_id, "parents": list(parents), "kind": meta.get("kind", "root"),
                "meta": meta, "hparams": hparams or {}, "status": "running", "created": time.time(),
            }
            self.store_manifest(run_id, manifest)

    def on_dataset_changed(self, indices: list[int] | None) -> None:
        """The active training subset changed (None = the whole dataset)."""
        self.active_subset = list(indices) if indices is not None else None

    # ---- commands ----------------------------------------------------------------------------
    def _register_run_commands(self, router: CommandRouter) -> None:
        router.register("list_runs", self.cmd_list_runs, schema=Empty, mutating=False,
                        description="runs with parents, kind, status and latest checkpoint")

    def cmd_list_runs(self, p: Empty) -> dict[str, Any]:
        runs = []
        for run_id in self.known_runs():
            manifest = self.read_manifest(run_id) or {"run_id": run_id, "parents": [], "kind": "unknown"}
            latest = self.ring(run_id).latest()
            runs.append({
                "run_id": run_id,
                "parents": manifest.get("parents", []),
                "kind": manifest.get("kind"),
                "status": manifest.get("status"),
                "current": run_id == self.cfg.run_name,
                "latest_checkpoint": str(latest.path) if latest else None,
                "latest_step": latest.step if latest else None,
            })
        return {"runs": runs, "current": self.cfg.run_name}


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 0
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None
