"""Domain errors, and the one map from them to gRPC status codes and HTTP statuses."""

from __future__ import annotations

import grpc


class RLHFError(Exception):
    """Base class of every error a service reports to its callers."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500


class InvalidInput(RLHFError):
    """The request is malformed or out of bounds."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class PayloadTooLarge(InvalidInput):
    """The request body is over the configured size limit (gRPC enforces its own message limit)."""

    http_status = 413


class AlreadyExists(RLHFError):
    """An idempotency key was used before for a different request."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409


class NotReady(RLHFError):
    """The service is loading or swapping weights and cannot answer yet."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class Overloaded(RLHFError):
    """Too much work queued; the caller should back off."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class IncompatibleWeights(RLHFError):
    """A checkpoint does not fit the served model (tensors missing, extra, or of other shapes)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class Unauthenticated(RLHFError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class WeightsCorrupt(RLHFError):
    """A checkpoint's sha256 does not match the one announced with it."""

    grpc_code = grpc.StatusCode.DATA_LOSS
    http_status = 500


def to_grpc(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RLHFError):
        return exc.grpc_code, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def to_http(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, RLHFError):
        return exc.http_status, str(exc)
    return 500, f"{type(exc).__name__}: {exc}"
