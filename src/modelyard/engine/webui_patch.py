"""The changes modelyard makes to llama.cpp's web UI source (tools/ui of b11434) before building it, and why.
Each is a regular-expression replacement that must match an exact number of times: a source that changed under
a patch fails the build with a one-line reason naming the patch and the file, rather than building a UI without
the fix.

There is one: a stale model list must not undo the status feed. The UI keeps its model rows from GET /v1/models
and updates them from /models/sse; `fetchRouterModels()` replaces every row with the list's answer when it
arrives. A list asked for while a model loads can answer "loading" and arrive after the feed's "loaded" (a load
takes 0.1-0.35 s under modelyard with --no-warmup, so the list the model menu fetches on opening is often in
flight across the end of the load); the row then says "loading" until the menu is opened again, with a spinner
and no Unload button. Router mode's loads take over a second, which hides the same race there. The patched UI
counts the feed's status records and keeps, for each row, the feed's status when the feed reported one after
the list was asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


class PatchError(RuntimeError):
    """The UI source no longer has what a patch changes; the message is the one line to show."""


@dataclass(frozen=True)
class Patch:
    name: str
    path: str  # relative to tools/ui
    pattern: str
    replacement: str
    count: int = 1


_STATUS = "src/lib/stores/models/status.svelte.ts"
_MODELS = "src/lib/stores/models/index.svelte.ts"

# the UI's source is indented with tabs: written here with four spaces a level, turned into tabs below
_FEED_STATUSES = """\
    /**
     * (modelyard) The status records the feed has applied, counted, and the latest one per model: a
     * /v1/models answer asked for before a record arrived is older than it, and must not undo it.
     */
    statusVersion = 0;
    private feedStatuses = new Map<string, { status: ServerModelStatus; version: number }>();

    /** The rows of a list asked for at `since`, with the feed's status where the feed reported one later. */
    withNewerStatuses(rows: ApiModelDataEntry[], since: number): ApiModelDataEntry[] {
        return rows.map((row) => {
            const seen = this.feedStatuses.get(row.id);

            if (!seen || seen.version <= since || seen.status === row.status?.value) return row;

            return { ...row, status: { ...row.status, value: seen.status } };
        });
    }

""".replace("    ", "\t")

PATCHES = (
    Patch("feed-statuses", _STATUS, r"(?m)^(?=\tprivate applyModelStatus\(event: ApiModelsSseEvent\): void \{$)",
          _FEED_STATUSES),
    Patch("count-feed-statuses", _STATUS,
          r"(?P<i>[\t ]*)const status = data\.status;\n\n(?P=i)this\.setRouterModelStatus\(model, status\);",
          "\\g<i>const status = data.status;\n\n"
          "\\g<i>this.feedStatuses.set(model, { status, version: ++this.statusVersion });\n"
          "\\g<i>this.setRouterModelStatus(model, status);"),
    # fetchRouterModels() and the first fetch (runFetch) both replace the rows with a list's answer
    Patch("list-keeps-newer-statuses", _MODELS,
          r"(?P<i>[\t ]*)const response = await ModelsService\.list\(\);\n\n(?P=i)this\.routerModels = response\.data;",
          "\\g<i>const since = this._status.statusVersion;\n"
          "\\g<i>const response = await ModelsService.list();\n\n"
          "\\g<i>this.routerModels = this._status.withNewerStatuses(response.data, since);", count=2),
)


def patched(text: str, patch: Patch) -> str:
    """`text` with the patch applied; PatchError when it does not match exactly `patch.count` times."""
    result, found = re.subn(patch.pattern, patch.replacement, text)
    if found != patch.count:
        raise PatchError(f"modelyard's web UI patch {patch.name!r} no longer applies to {patch.path} (matched "
                         f"{found} times, expected {patch.count}): the llama.cpp UI source changed")
    return result


def apply_all(ui_source: Path, patches: tuple[Patch, ...] = PATCHES) -> None:
    """Apply every patch to the tools/ui tree in place (the build's own extracted copy)."""
    for patch in patches:
        path = ui_source / patch.path
        try:
            text = path.read_text()
        except OSError as exc:
            raise PatchError(f"modelyard's web UI patch {patch.name!r}: {patch.path} is not in the llama.cpp UI "
                             f"source ({exc.strerror})") from None
        path.write_text(patched(text, patch))
