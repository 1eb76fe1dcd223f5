"""The HTTP layer: the Litestar app, stock uvicorn, streaming, errors, auth, request log, metrics, and the native and
OpenAI APIs (each as wire types, serving and routes). Importing this package imports nothing heavy."""
