"""The core: requests, their outcomes, admission and the service that runs them. No litestar, no llama_cpp."""
