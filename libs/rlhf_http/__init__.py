"""The REST front shared by services that have one (reward, feedback): a FastAPI app with
the project's error bodies and statuses, body limits, request metrics, bearer keys, an
OpenAPI page that works offline, and uvicorn inside the service's own event loop.

Services with a REST API install it with their extra (FastAPI and uvicorn); the leaf
library `rlhf_common` does not need them.
"""
