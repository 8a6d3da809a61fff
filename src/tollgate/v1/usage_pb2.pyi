import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_OK: _ClassVar[Outcome]
    OUTCOME_BLOCKED: _ClassVar[Outcome]
    OUTCOME_UPSTREAM_ERROR: _ClassVar[Outcome]
    OUTCOME_CLIENT_ABORTED: _ClassVar[Outcome]
    OUTCOME_USAGE_MISSING: _ClassVar[Outcome]
    OUTCOME_INTERNAL_ERROR: _ClassVar[Outcome]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_OK: Outcome
OUTCOME_BLOCKED: Outcome
OUTCOME_UPSTREAM_ERROR: Outcome
OUTCOME_CLIENT_ABORTED: Outcome
OUTCOME_USAGE_MISSING: Outcome
OUTCOME_INTERNAL_ERROR: Outcome

class UsageRecord(_message.Message):
    __slots__ = ("request_id", "created_at", "key_id", "end_user_id", "identity_source", "provider", "model", "endpoint", "streamed", "status_code", "outcome", "block_reason", "input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens", "total_tokens", "units", "cost_usd", "usage_flags", "pricing_error", "latency_ms", "ttft_ms", "tags", "limit_ids", "use_case_id", "use_case_name", "use_case_version", "logging_disabled", "upstream_base_uri", "traceparent")
    class UnitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    END_USER_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STREAMED_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_REASON_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    USAGE_FLAGS_FIELD_NUMBER: _ClassVar[int]
    PRICING_ERROR_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_IDS_FIELD_NUMBER: _ClassVar[int]
    USE_CASE_ID_FIELD_NUMBER: _ClassVar[int]
    USE_CASE_NAME_FIELD_NUMBER: _ClassVar[int]
    USE_CASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOGGING_DISABLED_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_BASE_URI_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    created_at: _timestamp_pb2.Timestamp
    key_id: str
    end_user_id: str
    identity_source: str
    provider: str
    model: str
    endpoint: str
    streamed: bool
    status_code: int
    outcome: Outcome
    block_reason: str
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int
    units: _containers.ScalarMap[str, float]
    cost_usd: str
    usage_flags: _containers.RepeatedScalarFieldContainer[str]
    pricing_error: str
    latency_ms: int
    ttft_ms: int
    tags: _containers.RepeatedScalarFieldContainer[str]
    limit_ids: _containers.RepeatedScalarFieldContainer[str]
    use_case_id: str
    use_case_name: str
    use_case_version: str
    logging_disabled: bool
    upstream_base_uri: str
    traceparent: str
    def __init__(self, request_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_id: _Optional[str] = ..., end_user_id: _Optional[str] = ..., identity_source: _Optional[str] = ..., provider: _Optional[str] = ..., model: _Optional[str] = ..., endpoint: _Optional[str] = ..., streamed: _Optional[bool] = ..., status_code: _Optional[int] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., block_reason: _Optional[str] = ..., input_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., cache_write_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., units: _Optional[_Mapping[str, float]] = ..., cost_usd: _Optional[str] = ..., usage_flags: _Optional[_Iterable[str]] = ..., pricing_error: _Optional[str] = ..., latency_ms: _Optional[int] = ..., ttft_ms: _Optional[int] = ..., tags: _Optional[_Iterable[str]] = ..., limit_ids: _Optional[_Iterable[str]] = ..., use_case_id: _Optional[str] = ..., use_case_name: _Optional[str] = ..., use_case_version: _Optional[str] = ..., logging_disabled: _Optional[bool] = ..., upstream_base_uri: _Optional[str] = ..., traceparent: _Optional[str] = ...) -> None: ...

class StreamRecordsRequest(_message.Message):
    __slots__ = ("end_user_id", "since", "until", "limit")
    END_USER_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    end_user_id: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    limit: int
    def __init__(self, end_user_id: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class SummarizeUsersRequest(_message.Message):
    __slots__ = ("since", "until")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    def __init__(self, since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UserSummary(_message.Message):
    __slots__ = ("end_user_id", "requests", "input_tokens", "output_tokens", "total_tokens", "cost_usd")
    END_USER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    end_user_id: str
    requests: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost_usd: str
    def __init__(self, end_user_id: _Optional[str] = ..., requests: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., cost_usd: _Optional[str] = ...) -> None: ...

class SummarizeUsersResponse(_message.Message):
    __slots__ = ("users",)
    USERS_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[UserSummary]
    def __init__(self, users: _Optional[_Iterable[_Union[UserSummary, _Mapping]]] = ...) -> None: ...
