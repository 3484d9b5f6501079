"""What the Prefect UI and other deployments see: table and markdown artifacts, PNG curves, events.

Pictures go into markdown artifacts as `data:image/png;base64,...` URIs: the UI renders those,
while `file://` links are blocked by the browser. The PNG files are also kept in the registry.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any, Sequence

Series = dict[str, Sequence[tuple[float, float]]]


def plot_curves(series: Series, title: str, xlabel: str, ylabel: str) -> bytes:
    """A line chart of one or more (x, y) series, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, marker="o" if len(points) < 30 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    """A table artifact (no-op outside a Prefect run, so the plain functions stay testable)."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(key=artifact_key(key), table=rows, description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)


def announce(event: str, kind: str, ref: str) -> None:
    """Emit `alignflow.<kind>.<what>` for a registered ref; deployments trigger on it."""
    from prefect.events import emit_event

    name = ref.partition("@")[0]
    emit_event(event=event, resource={"prefect.resource.id": f"alignflow.{kind}.{name}"}, payload={"ref": ref})


def run_logger():
    """The Prefect run logger inside a run, else a plain module logger."""
    import logging

    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a run context
        return logging.getLogger("alignflow")
