"""What a worker tells the scheduler about itself."""

from __future__ import annotations

from splitserve.common.protoconv import layout_to_proto
from splitserve.engine.engine import LLMEngine
from splitserve.v1 import scheduler_pb2 as spb
from splitserve.worker.config import WorkerConfig


def worker_info(config: WorkerConfig, role: int, grpc_address: str, engine: LLMEngine) -> spb.WorkerInfo:
    return spb.WorkerInfo(
        instance_id=config.instance_id, role=role, grpc_address=grpc_address,
        model=engine.loaded.source.name, max_model_len=engine.max_model_len,
        token_budget=config.engine.token_budget, max_num_seqs=config.engine.max_num_seqs,
        kv_layout=layout_to_proto(engine.layout), kv_transport=config.kv_transport_proto,
    )
