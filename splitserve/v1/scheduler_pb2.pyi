from splitserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
    WORKER_ROLE_COLOCATED: _ClassVar[WorkerRole]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_ROLE_COLOCATED: WorkerRole

class WorkerInfo(_message.Message):
    __slots__ = ("instance_id", "role", "grpc_address", "model", "max_model_len", "token_budget", "max_num_seqs", "kv_layout", "kv_transport", "num_cores", "prefix_cache_namespace")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    NUM_CORES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: WorkerRole
    grpc_address: str
    model: str
    max_model_len: int
    token_budget: int
    max_num_seqs: int
    kv_layout: _common_pb2.KvLayout
    kv_transport: _common_pb2.KvTransport
    num_cores: int
    prefix_cache_namespace: str
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., grpc_address: _Optional[str] = ..., model: _Optional[str] = ..., max_model_len: _Optional[int] = ..., token_budget: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., kv_layout: _Optional[_Union[_common_pb2.KvLayout, _Mapping]] = ..., kv_transport: _Optional[_Union[_common_pb2.KvTransport, str]] = ..., num_cores: _Optional[int] = ..., prefix_cache_namespace: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker", "stats", "held_request_ids")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    HELD_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    stats: _common_pb2.WorkerStats
    held_request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ..., stats: _Optional[_Union[_common_pb2.WorkerStats, _Mapping]] = ..., held_request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s", "leader", "epoch")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    leader: bool
    epoch: int
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., leader: _Optional[bool] = ..., epoch: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("instance_id", "stats", "held_request_ids", "prefill_done", "request_done", "cached_blocks")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    HELD_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_DONE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DONE_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    stats: _common_pb2.WorkerStats
    held_request_ids: _containers.RepeatedScalarFieldContainer[str]
    prefill_done: _containers.RepeatedCompositeFieldContainer[PrefillDoneRequest]
    request_done: _containers.RepeatedCompositeFieldContainer[RequestDoneRequest]
    cached_blocks: CachedBlocks
    def __init__(self, instance_id: _Optional[str] = ..., stats: _Optional[_Union[_common_pb2.WorkerStats, _Mapping]] = ..., held_request_ids: _Optional[_Iterable[str]] = ..., prefill_done: _Optional[_Iterable[_Union[PrefillDoneRequest, _Mapping]]] = ..., request_done: _Optional[_Iterable[_Union[RequestDoneRequest, _Mapping]]] = ..., cached_blocks: _Optional[_Union[CachedBlocks, _Mapping]] = ...) -> None: ...

class CachedBlocks(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, keys: _Optional[_Iterable[int]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("leader", "epoch", "kv_awaited_ids")
    LEADER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KV_AWAITED_IDS_FIELD_NUMBER: _ClassVar[int]
    leader: bool
    epoch: int
    kv_awaited_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, leader: _Optional[bool] = ..., epoch: _Optional[int] = ..., kv_awaited_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PrefillDoneRequest(_message.Message):
    __slots__ = ("request_id", "instance_id", "kv", "output_token_ids", "finish_reason", "error", "timeline")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    instance_id: str
    kv: _common_pb2.KvHandle
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    error: str
    timeline: _common_pb2.Timeline
    def __init__(self, request_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., kv: _Optional[_Union[_common_pb2.KvHandle, _Mapping]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., error: _Optional[str] = ..., timeline: _Optional[_Union[_common_pb2.Timeline, _Mapping]] = ...) -> None: ...

class PrefillDoneResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RequestDoneRequest(_message.Message):
    __slots__ = ("request_id", "instance_id", "finish_reason", "error", "num_output_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    instance_id: str
    finish_reason: _common_pb2.FinishReason
    error: str
    num_output_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., error: _Optional[str] = ..., num_output_tokens: _Optional[int] = ...) -> None: ...

class RequestDoneResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("instance_id", "finished")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    finished: bool
    def __init__(self, instance_id: _Optional[str] = ..., finished: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HandBackRequest(_message.Message):
    __slots__ = ("request_id", "instance_id", "kv_not_pulled")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    KV_NOT_PULLED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    instance_id: str
    kv_not_pulled: bool
    def __init__(self, request_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., kv_not_pulled: _Optional[bool] = ...) -> None: ...

class HandBackResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RecommendationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Placement(_message.Message):
    __slots__ = ("num_prefill", "prefill_cores", "num_decode", "decode_cores", "num_colocated", "colocated_cores", "token_budget", "max_num_seqs")
    NUM_PREFILL_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CORES_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_FIELD_NUMBER: _ClassVar[int]
    DECODE_CORES_FIELD_NUMBER: _ClassVar[int]
    NUM_COLOCATED_FIELD_NUMBER: _ClassVar[int]
    COLOCATED_CORES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    num_prefill: int
    prefill_cores: int
    num_decode: int
    decode_cores: int
    num_colocated: int
    colocated_cores: int
    token_budget: int
    max_num_seqs: int
    def __init__(self, num_prefill: _Optional[int] = ..., prefill_cores: _Optional[int] = ..., num_decode: _Optional[int] = ..., decode_cores: _Optional[int] = ..., num_colocated: _Optional[int] = ..., colocated_cores: _Optional[int] = ..., token_budget: _Optional[int] = ..., max_num_seqs: _Optional[int] = ...) -> None: ...

class Recommendation(_message.Message):
    __slots__ = ("available", "workload", "running", "recommended", "running_goodput", "recommended_goodput", "change", "reason", "planned_at")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_GOODPUT_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_GOODPUT_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PLANNED_AT_FIELD_NUMBER: _ClassVar[int]
    available: bool
    workload: WorkloadEstimate
    running: Placement
    recommended: Placement
    running_goodput: float
    recommended_goodput: float
    change: bool
    reason: str
    planned_at: float
    def __init__(self, available: _Optional[bool] = ..., workload: _Optional[_Union[WorkloadEstimate, _Mapping]] = ..., running: _Optional[_Union[Placement, _Mapping]] = ..., recommended: _Optional[_Union[Placement, _Mapping]] = ..., running_goodput: _Optional[float] = ..., recommended_goodput: _Optional[float] = ..., change: _Optional[bool] = ..., reason: _Optional[str] = ..., planned_at: _Optional[float] = ...) -> None: ...

class ClusterStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerState(_message.Message):
    __slots__ = ("worker", "stats", "last_seen_s", "draining")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    stats: _common_pb2.WorkerStats
    last_seen_s: float
    draining: bool
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ..., stats: _Optional[_Union[_common_pb2.WorkerStats, _Mapping]] = ..., last_seen_s: _Optional[float] = ..., draining: _Optional[bool] = ...) -> None: ...

class ClusterState(_message.Message):
    __slots__ = ("workers", "num_waiting", "num_running", "workload", "recommendation", "leader", "epoch")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerState]
    num_waiting: int
    num_running: int
    workload: WorkloadEstimate
    recommendation: Recommendation
    leader: bool
    epoch: int
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerState, _Mapping]]] = ..., num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., workload: _Optional[_Union[WorkloadEstimate, _Mapping]] = ..., recommendation: _Optional[_Union[Recommendation, _Mapping]] = ..., leader: _Optional[bool] = ..., epoch: _Optional[int] = ...) -> None: ...

class WorkloadEstimate(_message.Message):
    __slots__ = ("window_s", "arrival_rate", "num_arrivals", "prompt_len_mean", "prompt_len_p50", "prompt_len_p90", "num_finished", "output_len_mean", "output_len_p50", "output_len_p90")
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_RATE_FIELD_NUMBER: _ClassVar[int]
    NUM_ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_MEAN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_P50_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_P90_FIELD_NUMBER: _ClassVar[int]
    NUM_FINISHED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LEN_MEAN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LEN_P50_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LEN_P90_FIELD_NUMBER: _ClassVar[int]
    window_s: float
    arrival_rate: float
    num_arrivals: int
    prompt_len_mean: float
    prompt_len_p50: float
    prompt_len_p90: float
    num_finished: int
    output_len_mean: float
    output_len_p50: float
    output_len_p90: float
    def __init__(self, window_s: _Optional[float] = ..., arrival_rate: _Optional[float] = ..., num_arrivals: _Optional[int] = ..., prompt_len_mean: _Optional[float] = ..., prompt_len_p50: _Optional[float] = ..., prompt_len_p90: _Optional[float] = ..., num_finished: _Optional[int] = ..., output_len_mean: _Optional[float] = ..., output_len_p50: _Optional[float] = ..., output_len_p90: _Optional[float] = ...) -> None: ...
