"""The /v1 front end: a lightx2v-compatible task API (FastAPI) in front of Triton's `wan_pipeline` model.

Layout (vLLM-style): `api_router` thin routes, `protocol` wire models and validation rules, `serving` the
service logic, `tasks` the lifecycle (queue, state machine, slots), `store` task records (SQLite),
`triton_client` the gRPC streaming client, `files` confined paths and Range downloads, `metrics`
Prometheus, `settings` flags and environment, `app` the FastAPI application. Hardening (SECURITY.md): `auth`
API keys, `retention` the result/input sweep, `breaker` the failure breaker, `server` uvicorn with a draining
SIGTERM. Run: `python -m frontend`.
"""
