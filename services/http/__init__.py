"""`python -m services.http`: an OpenAI-compatible HTTP front door, a thin client of the
scheduler's gRPC API (GET /v1/models, POST /v1/completions, POST /v1/chat/completions).

The HTTP stack is Starlette on uvicorn. aiohttp would do as well (one package, its own
server), but Starlette is a small routing layer over ASGI, whose raw `receive` tells a
client's disconnect while a request is still queued, and uvicorn is the server FastAPI and
vLLM's OpenAI server run on; FastAPI itself adds pydantic request models and OpenAPI docs,
which a front door that forwards every field to a protobuf message does not need.
"""
