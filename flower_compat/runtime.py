"""Flower's SuperNode runtime internals, for the site's long-lived worker and tools.

:mod:`wardround.client.site_worker` runs ClientApps in one long-lived process and
so speaks the SuperNode's runtime protocol itself (tasks, heartbeats, message
pulls); :mod:`wardround.simulations.local_grid` builds messages the way the
SuperLink does.
Import this module lazily: it pulls in Flower's gRPC and protobuf stack.
"""

from __future__ import annotations

from flwr.common.serde import (
    context_from_proto,
    fab_from_proto,
    message_from_proto,
    message_to_proto,
    run_from_proto,
)
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
    SendTaskHeartbeatResponse,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

__all__ = [
    "AcquireTaskRequest",
    "HeartbeatSender",
    "Node",
    "ProtoMessage",
    "PullAppMessagesRequest",
    "PullTaskInputRequest",
    "Run",
    "RuntimeHttpClient",
    "RuntimeTokenHttpInterceptor",
    "RuntimeVersionHttpInterceptor",
    "SendTaskHeartbeatRequest",
    "SendTaskHeartbeatResponse",
    "SuperExecAuthHttpInterceptor",
    "TaskIdentity",
    "TaskType",
    "context_from_proto",
    "fab_from_proto",
    "make_confirm_message_received_fn_protobuf",
    "make_pull_object_fn_protobuf",
    "make_simple_http_retry_invoker",
    "message_from_proto",
    "message_to_proto",
    "pull_and_inflate_object_from_tree",
    "push_message",
    "push_task_output",
    "run_from_proto",
]
