"""The light ops tools, the client library and the health check: they need requests and tenacity only (no litestar,
no llama_cpp), so a host that only watches or calls the service installs the bare package."""
