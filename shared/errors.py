"""The one place where exceptions become gRPC status codes: the error hierarchy and the servicer decorator."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class ServiceError(Exception):
    """An error whose message is safe to show to a client, with the gRPC status code it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class RequestError(ServiceError, ValueError):
    """Invalid user input: `RequestError("width", "must be a multiple of 16")` -> INVALID_ARGUMENT."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field, self.rule = field, rule


class TensorStreamError(ServiceError):
    """A bad tensor stream: kind DATA_LOSS for corrupt bytes, INVALID_ARGUMENT for a bad spec or order."""

    DATA_LOSS = grpc.StatusCode.DATA_LOSS
    INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, kind: grpc.StatusCode, message: str) -> None:
        if kind not in (self.DATA_LOSS, self.INVALID_ARGUMENT):
            raise ValueError(f"TensorStreamError kind must be DATA_LOSS or INVALID_ARGUMENT, got {kind}")
        super().__init__(message, kind)
        self.kind = kind


class StageUnavailable(ServiceError):
    """A downstream stage (text_encoder, denoiser, vae) cannot be reached or is not ready -> UNAVAILABLE."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, stage: str, reason: str = "") -> None:
        super().__init__(f"stage {stage} unavailable" + (f": {reason}" if reason else ""))
        self.stage = stage


class Overloaded(ServiceError):
    """No capacity for the request now (queue full, out of GPU memory) -> RESOURCE_EXHAUSTED; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str = "server overloaded, retry later") -> None:
        super().__init__(message)


class Cancelled(ServiceError):
    """The work was cancelled (by the client, or a stage call was cancelled) -> CANCELLED."""

    code = grpc.StatusCode.CANCELLED

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message)


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before the work finished -> DEADLINE_EXCEEDED."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, message: str = "deadline exceeded") -> None:
        super().__init__(message)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and client-safe message for an exception; unexpected ones are logged with a traceback."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s: %s", error_id, type(exc).__name__, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id}); see the server log"


_STAGE_CODES_PASSED_ON = {
    grpc.StatusCode.INVALID_ARGUMENT,  # the stage rejected something of the user's request
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DATA_LOSS,
}


_BUILT_BY_THE_CALLER = ("latents", "prompt_embeds", "negative_prompt_embeds")


def stage_error(stage: str, err: grpc.RpcError) -> ServiceError:
    """Translate a failed call to a stage into the error the caller reports, naming the stage."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else "") or code.name.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        return StageUnavailable(stage, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(_BUILT_BY_THE_CALLER):
        # tensors the caller (the gateway) made from another stage's output, not the client's request: a stage's
        # failure (a bf16 decode that overflowed, say), INTERNAL with its message
        return ServiceError(f"{stage}: {details}", grpc.StatusCode.INTERNAL)
    if code == grpc.StatusCode.INVALID_ARGUMENT and "unknown field number" in details:
        # the caller refused the client's own unknown fields: a stage's refusal means their protos differ
        return ServiceError(f"{stage}: {details} (a deployment error: the gateway and its stages run different API "
                            "versions)", grpc.StatusCode.FAILED_PRECONDITION)
    if code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(("model: ", "params.model: ")):
        # the caller (the gateway) sends the model it serves: the stage serving another is the deployment's fault
        return ServiceError(f"{stage}: {details} (a deployment error: the gateway and its stages must serve one "
                            "model)", grpc.StatusCode.FAILED_PRECONDITION)
    if code in _STAGE_CODES_PASSED_ON:  # named once: the stage's own messages may already start with its name
        return ServiceError(details if details.startswith(f"{stage}:") else f"{stage}: {details}", code)
    log.error("stage %s failed with %s: %s", stage, code, details)
    if code == grpc.StatusCode.INTERNAL and "Traceback" not in details:
        # our services' INTERNAL messages are client-safe (ServiceError's, or to_status's error id for the logs)
        return ServiceError(f"stage {stage} failed: {details[:500]}", grpc.StatusCode.INTERNAL)
    return ServiceError(f"stage {stage} failed ({code.name})", grpc.StatusCode.INTERNAL)


@contextmanager
def calling_stage(stage: str) -> Iterator[None]:
    """Wrap calls to a stage (`with calling_stage("vae"): ...`) so failures name it, with the right code."""
    try:
        yield
    except grpc.RpcError as err:
        raise stage_error(stage, err) from None


# How long a call that fails while its client is still uploading reads on (and drops) the rest of the upload.
DRAIN_SECONDS = 5.0


async def drain_requests(request_iterator, seconds: float = DRAIN_SECONDS) -> None:
    """Read and drop what is left of a call's request stream, for up to `seconds`. A status sent while the client
    is still sending reaches it as INTERNAL ("RST_STREAM"), not as its own code (grpc/grpc#36066), so a call that
    fails early (refused when full, a bad first message) ends the upload first. A no-op once the stream ended."""
    async def rest() -> None:
        async for _ in request_iterator:
            pass

    try:
        await asyncio.wait_for(rest(), seconds)
    except Exception:  # noqa: BLE001 - a client still sending after `seconds`, a broken or undecodable stream:
        pass  # the status that was due goes out as it is


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, request: Any = None) -> None:
    code, message = to_status(exc)
    if code != grpc.StatusCode.INTERNAL:
        log.info("%s: %s", code.name, message)
    if hasattr(request, "__aiter__"):  # a request stream
        await drain_requests(request)
    await context.abort(code, message)


def grpc_errors(method: F) -> F:
    """Decorate a grpc.aio handler (unary or streaming response) so exceptions become gRPC statuses.

    ServiceError -> its code and message; TimeoutError -> DEADLINE_EXCEEDED; anything else -> INTERNAL with an
    error id (the traceback goes to the server log only). `context.abort` inside the handler and task
    cancellation (asyncio.CancelledError, when the client cancels) pass through unchanged. A handler of a request
    stream reads the rest of its stream before the status goes out (`drain_requests`).
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(*args):  # (self, request, context) or (request, context)
            try:
                async for response in method(*args):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the one boundary where every error is mapped
                await _abort(args[-1], exc, args[-2])

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(*args):
        try:
            return await method(*args)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the one boundary where every error is mapped
            await _abort(args[-1], exc, args[-2])

    return unary_wrapper  # type: ignore[return-value]
