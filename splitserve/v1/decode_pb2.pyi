from splitserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("request", "output_token_ids", "kv")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.QueuedRequest
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    kv: _common_pb2.KvHandle
    def __init__(self, request: _Optional[_Union[_common_pb2.QueuedRequest, _Mapping]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., kv: _Optional[_Union[_common_pb2.KvHandle, _Mapping]] = ...) -> None: ...

class DecodeSubmitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
