"""TextEncoderService: prompts in, one embedding tensor per prompt streamed out (thin layer over the engine)."""

from __future__ import annotations

import time

import torch

from smartdiff.services.text_encoder.engine import TextEncoderEngine
from smartdiff.shared.config import ModelConfig
from smartdiff.shared.errors import Cancelled, RequestError, grpc_errors
from smartdiff.shared.memory import measure_peak
from smartdiff.shared.request import MAX_PROMPT_CHARS, reject_unknown_fields
from smartdiff.shared.tensor_stream import WIRE_DTYPES, tensor_to_messages
from smartdiff.shared.worker import Done, StageWorker
from smartdiff.text_encoder.v1 import text_encoder_pb2 as pb
from smartdiff.text_encoder.v1 import text_encoder_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextEncoderService"].full_name
MAX_PROMPTS = 16


def check_model(requested: str, served: ModelConfig) -> None:
    if requested and requested != served.name:
        raise RequestError("model", f"this deployment serves {served.name!r}, not {requested!r}")


class TextEncoderServicer(pb_grpc.TextEncoderServiceServicer):
    def __init__(self, model: ModelConfig, engine: TextEncoderEngine, worker: StageWorker):
        self.model = model
        self.engine = engine
        self.worker = worker

    def validate(self, request: pb.EncodeRequest) -> torch.dtype:
        reject_unknown_fields(request, "request")
        check_model(request.model, self.model)
        if not 1 <= len(request.prompts) <= MAX_PROMPTS:
            raise RequestError("prompts", f"must hold 1 to {MAX_PROMPTS} prompts, got {len(request.prompts)}")
        for i, p in enumerate(request.prompts):
            if len(p) > MAX_PROMPT_CHARS:
                raise RequestError(f"prompts[{i}]", f"must be at most {MAX_PROMPT_CHARS} characters")
        if request.dtype == 0:
            return self.engine.dtype  # unspecified: the engine's own dtype, no conversion
        if request.dtype not in WIRE_DTYPES or not WIRE_DTYPES[request.dtype].is_floating_point:
            raise RequestError("dtype", "must be FLOAT32, FLOAT16, BFLOAT16 or UNSPECIFIED")
        return WIRE_DTYPES[request.dtype]

    @grpc_errors
    async def Encode(self, request: pb.EncodeRequest, context):
        out_dtype = self.validate(request)
        prompts = list(request.prompts)
        start = time.perf_counter()
        embeddings, peak, full_counts = None, None, None

        def job(emit, stop):
            if stop():  # cancelled, or past its deadline while it waited in the queue: skip the encode
                raise Cancelled("cancelled before the encode started")
            with measure_peak(self.engine.device) as p:
                # straight to the host, where they are sent from (an encoder on the CPU at level 2 never touches the GPU)
                return self.engine.encode(prompts, device="cpu"), p, self.engine.token_counts(prompts)

        async for item in self.worker.stream(job, context):
            if isinstance(item, Done):
                embeddings, peak, full_counts = item.value
        seconds = time.perf_counter() - start
        for i, emb in enumerate(embeddings):
            for msg in tensor_to_messages(emb.to("cpu", out_dtype).contiguous(), pb.EncodeResponse, "embedding",
                                          name=f"prompt_{i}"):
                yield msg
        yield pb.EncodeResponse(summary=pb.EncodeSummary(
            token_counts=[int(e.shape[0]) for e in embeddings],
            truncated_prompts=[i for i, n in enumerate(full_counts) if n > self.engine.config.text_len],
            encode_seconds=seconds, device=str(self.engine.device), peak_memory_bytes=peak.bytes or 0,
            low_mem_level=int(self.engine.memory.level),
        ))


async def start(model: ModelConfig, layout, system, address: str):
    """Load the encoder (from `layout`, or random weights for random presets), warm up, serve on `address`."""
    from smartdiff.shared.serving import start_stage

    level = system.low_mem_level  # 2 and 3: the encoder runs on the CPU
    if layout is None:
        engine = TextEncoderEngine.random(model.text_encoder, system.device, system.dtype, seed=0, low_mem_level=level)
    else:
        engine = TextEncoderEngine.from_checkpoint(layout.kind, layout.text_encoder, layout.tokenizer,
                                                   model.text_encoder, system.device, system.dtype, low_mem_level=level)
    servicer = TextEncoderServicer(model, engine, StageWorker("text_encoder", system.max_queue, engine.device))
    return await start_stage(SERVICE_NAME, pb_grpc.add_TextEncoderServiceServicer_to_server, servicer, address,
                             system.max_queue, warmup=lambda: engine.encode(["warm-up prompt"], device="cpu"))  # as Encode
