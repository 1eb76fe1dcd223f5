"""``GET /metrics``: the app's Prometheus registry in the text exposition format."""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency

from innova_smollm.metrics import CONTENT_TYPE, Metrics


@get(
    "/metrics",
    summary="Prometheus metrics",
    description="Requests by route and status, rejections by reason, cancellations, token counts, latency "
    "histograms (queue wait, time to first token, time per output token, total), model state and process memory.",
    tags=["operations"],
    sync_to_thread=False,
)
def metrics_endpoint(metrics: NamedDependency[Metrics]) -> Response[bytes]:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE)
