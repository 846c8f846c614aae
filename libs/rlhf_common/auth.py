"""Bearer-token API keys, checked the same way for REST and gRPC, by every service that
takes them (`RLHF_<SERVICE>_API_KEYS`)."""

from __future__ import annotations

import hashlib
import hmac

import grpc

from .errors import Unauthenticated


def parse_keys(raw: str) -> list[str]:
    """Comma-separated keys, blanks dropped."""
    return [k.strip() for k in raw.split(",") if k.strip()]


def bad_key(keys: list[str]) -> str | None:
    """'<key #i of n>' for the first key that is too weak to accept, or None. The key itself
    is never shown, only its position."""
    for i, k in enumerate(keys):
        if not (len(k) >= 8 and k.isprintable() and " " not in k):
            return f"<key #{i + 1} of {len(keys)}>"
    return None


KEY_RULE = "every key must be at least 8 printable characters without spaces"


class ApiKeys:
    """A set of accepted keys; with no keys configured, every caller is let in."""

    def __init__(self, keys: list[str]):
        # Digests, so that every comparison is of equal length and takes the same time
        # whatever the key given (its length included).
        self._keys = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | list[str] | None) -> None:
        """Raise Unauthenticated unless `authorization` is 'Bearer <a configured key>'. Given
        every value the request carried (a list), more than one is refused: REST and gRPC
        then agree, instead of one taking the first and the other the last."""
        if not self._keys:
            return
        if isinstance(authorization, list):
            if len(authorization) > 1:
                raise Unauthenticated(f"{len(authorization)} authorization headers: send exactly one")
            authorization = authorization[0] if authorization else None
        if not authorization:
            raise Unauthenticated("missing credentials: send 'authorization: Bearer <api key>'")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed credentials: expected 'Bearer <api key>'")
        given = hashlib.sha256(token.strip().encode()).digest()
        # Compare against every key (no early exit), in constant time per key.
        if not any([hmac.compare_digest(given, k) for k in self._keys]):
            raise Unauthenticated("invalid API key")


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires the bearer key on the methods of `service` only (health and reflection stay open).

    Placed after the error interceptor, it raises Unauthenticated from the handler so that
    the one error map turns it into UNAUTHENTICATED and the request metrics count it.
    """

    def __init__(self, keys: ApiKeys, service: str):
        self.keys = keys
        self.prefix = f"/{service}/"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self.keys.enabled or not handler_call_details.method.startswith(self.prefix):
            return handler
        given = [v for k, v in (handler_call_details.invocation_metadata or ()) if k == "authorization"]
        try:
            self.keys.check(given)
        except Unauthenticated as exc:
            err = exc

            async def deny(request_or_iterator, context):
                raise err

            async def deny_stream(request_or_iterator, context):
                raise err
                yield  # an async generator, for methods with streamed responses

            kinds = ((handler.unary_unary, deny, grpc.unary_unary_rpc_method_handler),
                     (handler.unary_stream, deny_stream, grpc.unary_stream_rpc_method_handler),
                     (handler.stream_unary, deny, grpc.stream_unary_rpc_method_handler),
                     (handler.stream_stream, deny_stream, grpc.stream_stream_rpc_method_handler))
            make, fn = next((mk, fn) for inner, fn, mk in kinds if inner is not None)
            return make(fn, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
        return handler
