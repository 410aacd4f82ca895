"""The HTTP server: an OpenAI-compatible API (FastAPI on uvicorn) over the serving engine."""
