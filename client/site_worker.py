"""The site's warm worker: runs every ClientApp task of the site's SuperNode in one process.

Flower's default SuperNode isolation (``subprocess``) starts a fresh ``flwr-clientapp``
process per message: torch, the model and the site's data are loaded again for every
train, evaluate and SecAgg+ stage message. With ``--isolation process`` the SuperNode
instead waits for an outside process to take its tasks over its local Runtime API
(127.0.0.1 only). This worker is that process: it asks for tasks the way Flower's
SuperExec does (``AcquireTask``), then runs each task in-process the way
``flwr-clientapp`` does (Flower's own ``pull_task_input``, ``push_message``,
``push_task_output``), so the trainer, model and data stay loaded between messages.

Before a task runs, the FAB's hash must be on the site's allowlist
(:mod:`wardround.client.approvals`); a refused task gets an error reply that reaches
the coordinator as a clear status.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..common.errors import safe_error_reason
from .approvals import AppApprovals
from .replay import clear_replayed, replayed_round

log = logging.getLogger(__name__)

APP_NOT_APPROVED = "AppNotApproved"


@dataclass
class TaskOutcome:
    """What one task did (for the site's audit log)."""

    run_id: int
    fab_hash: str
    message_type: str
    group: str
    approved: bool
    ok: bool
    bytes_in: int
    bytes_out: int
    seconds: float
    error: str = ""
    app_seconds: float = 0.0
    """Time inside the ClientApp (training, evaluation, SecAgg+), without transfers."""
    pull_seconds: float = 0.0
    """Time to fetch the task's message from the SuperNode."""
    metrics: dict[str, float] = field(default_factory=dict)
    tensors: list[str] = field(default_factory=list)
    """The names of the tensors in the reply (what left the site)."""
    server_round: int | None = None
    """The round the coordinator's message named (its config record), if any."""
    run_name: str = ""
    """The coordinator's run id the message named (the privacy ledger's key)."""
    replayed: bool = False
    """The answer was one the site had sent before, sent again (a resumed round)."""


class TaskObserver:
    """Receives each finished task; the site daemon writes them to the audit log."""

    def on_task(self, outcome: TaskOutcome) -> None:
        """Called after a task's reply was pushed."""


class SiteWorker:
    """Take ClientApp tasks from a local SuperNode and run them in this process.

    Parameters
    ----------
    runtime_api_address : str
        The SuperNode's Runtime API (``127.0.0.1:PORT``), on loopback.
    approvals : AppApprovals
        The site's FAB allowlist.
    observer : TaskObserver | None
        Told about every finished task.
    poll_interval_s : float
        Pause between ``AcquireTask`` calls when nothing is pending.
    superexec_secret : bytes | None
        The secret the SuperNode was started with (``--superexec-auth-secret-file``):
        ``AcquireTask`` calls are signed with it, the way Flower's SuperExec signs
        them, so no other local user can take the site's tasks.
    runtime_ca_pem : bytes | None
        The CA of the Runtime API's certificate (:mod:`.runtime_tls`): the worker
        talks to nothing else, so no other local user can hand it tasks by
        listening on the port. None: plain HTTP (a SuperNode started without TLS).
    """

    def __init__(
        self,
        runtime_api_address: str,
        approvals: AppApprovals,
        observer: TaskObserver | None = None,
        poll_interval_s: float = 0.1,
        superexec_secret: bytes | None = None,
        runtime_ca_pem: bytes | None = None,
    ) -> None:
        self.runtime_api_address = runtime_api_address
        self.superexec_secret = superexec_secret
        self.runtime_ca_pem = runtime_ca_pem
        self.approvals = approvals
        self.observer = observer or TaskObserver()
        self.refused_apps = 0
        """Tasks of unapproved apps so far: logged like refused answers, thinned."""
        self.poll_interval_s = poll_interval_s
        self.tasks_run = 0
        self._client_app: Any = None
        self._stopping = threading.Event()

    def warm_up(self) -> None:
        """Import torch and the ClientApp now, not on the first message."""
        from .app import app

        self._client_app = app

    def serve(self, stop: threading.Event) -> None:
        """Run tasks until ``stop`` is set."""
        from ..flower_compat.constants import RUNTIME_DEPENDENCY_INSTALL  # noqa: F401
        from ..flower_compat.runtime import AcquireTaskRequest, TaskType

        self._stopping = stop  # a call retrying a gone SuperNode gives up on stop
        self.warm_up()
        address = self.runtime_api_address
        acquirer = self._runtime_client(component="SuperExec")
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        impostor_said = False
        try:
            while not stop.is_set():
                if self.runtime_api_address != address:  # the SuperNode moved
                    acquirer.close()
                    address = self.runtime_api_address
                    acquirer = self._runtime_client(component="SuperExec")
                try:
                    response = acquirer.AcquireTask(request)
                except Exception as exc:  # the SuperNode may be restarting
                    if _status_code(exc) == 401:
                        log.error(
                            "the SuperNode refused the worker's SuperExec secret "
                            "(another SuperNode on this port, or the secret changed)"
                        )
                    elif _is_tls_failure(exc):
                        if not impostor_said:
                            log.error(
                                "what listens on %s does not show this daemon's "
                                "Runtime API certificate: not the site's SuperNode; "
                                "the worker does not talk to it",
                                address,
                            )
                        impostor_said = True
                    else:
                        log.debug("AcquireTask failed: %s", exc)
                    stop.wait(1.0)
                    continue
                impostor_said = False
                if response.HasField("task") and response.token:
                    try:
                        self.run_task(response.token)
                    except Exception:  # one broken task must not end the worker
                        log.exception("a ClientApp task failed outside the app")
                else:
                    stop.wait(self.poll_interval_s)
        finally:
            acquirer.close()

    def run_task(self, token: str) -> TaskOutcome | None:
        """Run one ClientApp task the way ``flwr-clientapp`` does, without exiting."""
        from flwr.app import Message
        from flwr.app.error import Error

        from ..common.wirebytes import content_bytes
        from ..flower_compat.constants import ErrorCode, SubStatus
        from ..flower_compat.runtime import HeartbeatSender

        cancelled = threading.Event()
        client = self._runtime_client(
            component="flwr-clientapp", token=token, cancelled=cancelled
        )
        heartbeat = HeartbeatSender(task_heartbeat_fn(client, cancelled))
        heartbeat.start()
        started = time.perf_counter()
        message = reply = context = None
        outcome: TaskOutcome | None = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run, fab = pull_task_input(client)
            pulled = time.perf_counter() - started
            decision = self.approvals.check(
                fab.hash_str, fab.content, dict(context.run_config)
            )
            outcome = TaskOutcome(
                run_id=int(run.run_id),
                fab_hash=fab.hash_str,
                message_type=str(message.metadata.message_type),
                group=str(message.metadata.group_id),
                approved=decision.approved,
                ok=False,
                bytes_in=_safe_bytes(content_bytes, message),
                bytes_out=0,
                seconds=0.0,
                pull_seconds=pulled,
            )
            outcome.server_round, outcome.run_name = _round_and_run(message)
            if not decision.approved:
                from .answer_audit import worth_recording

                self.refused_apps += 1
                if worth_recording(self.refused_apps):
                    log.warning(
                        "refused run %s: %s (%d refused tasks so far)",
                        run.run_id,
                        decision.reason,
                        self.refused_apps,
                    )
                reason = f"[{APP_NOT_APPROVED}] {decision.reason}"
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                    reply_to=message,
                )
                details = reason
            else:
                app_started = time.perf_counter()
                clear_replayed()
                reply = self._client_app(message=message, context=context)
                outcome.app_seconds = time.perf_counter() - app_started
                outcome.replayed = replayed_round() is not None
                sub_status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - any failure becomes an error reply
            log.error("task failed: %s", type(exc).__name__, exc_info=exc)
            details = safe_error_reason(exc)
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                    reply_to=message,
                )
        finally:
            _end_task(client, reply, context, sub_status, details)
            heartbeat.stop()
            client.close()
        self.tasks_run += 1
        if outcome is not None:
            self._report(outcome, started, sub_status == SubStatus.COMPLETED, reply)
        return outcome

    def _report(
        self, outcome: TaskOutcome, started: float, completed: bool, reply: Any
    ) -> None:
        """Complete a task's outcome from its reply and hand it to the observer."""
        from ..common.wirebytes import content_bytes

        outcome.seconds = time.perf_counter() - started
        outcome.ok = completed and not (reply is not None and reply.has_error())
        if reply is not None and reply.has_error():
            outcome.error = str(reply.error.reason)
        elif reply is not None:
            outcome.bytes_out = _safe_bytes(content_bytes, reply)
            outcome.metrics = _numeric_metrics(reply)
            outcome.tensors = _tensor_names(reply)
        self.observer.on_task(outcome)

    def _runtime_client(
        self,
        component: str,
        token: str | None = None,
        cancelled: threading.Event | None = None,
    ) -> Any:
        from ..flower_compat.runtime import (
            RuntimeHttpClient,
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
            make_simple_http_retry_invoker,
        )

        interceptors: list[Any] = [
            RuntimeVersionHttpInterceptor(component_name=component)
        ]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        retry = make_simple_http_retry_invoker()
        if token is None and self.superexec_secret is not None:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=self.superexec_secret,
                    protected_methods=SUPEREXEC_AUTH_METHODS,
                )
            )
        # Flower's invoker ends its process (SIGINT) on a 401: right for a one-task
        # process, but here that would end the site daemon. A 401 comes from a
        # SuperNode that restarted (its coordinator did) and no longer knows the
        # task's token, or a refused AcquireTask: give up the call, and the worker
        # goes on with the next task (serve() says why).
        flower_giveup_401 = retry.should_giveup
        retry.should_giveup = lambda exc: (
            _status_code(exc) == 401
            or bool(flower_giveup_401 and flower_giveup_401(exc))
        )
        if cancelled is not None:
            # A task's calls stop retrying once its SuperNode has dropped the task
            # (restarted, or the run ended): the worker moves on to the next one.
            flower_giveup: Callable[[Exception], bool] | None = retry.should_giveup
            retry.should_giveup = lambda exc: (
                cancelled.is_set() or bool(flower_giveup and flower_giveup(exc))
            )
            retry.max_time = TASK_CALL_RETRY_S
        # A call retrying a SuperNode that moved to another port (another process
        # took this one) gives up, so the worker follows it; so does one retrying a
        # SuperNode that is gone when the daemon stops.
        address = self.runtime_api_address
        before_move: Callable[[Exception], bool] | None = retry.should_giveup
        retry.should_giveup = lambda exc: (
            self._stopping.is_set()
            or self.runtime_api_address != address
            or bool(before_move and before_move(exc))
        )
        return RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=self.runtime_ca_pem is None,
            root_certificates=self.runtime_ca_pem,
            interceptors=interceptors,
            retry_invoker=retry,
        )


TASK_CALL_RETRY_S = 120.0
"""How long one call of a task retries a SuperNode that does not answer."""
SUPEREXEC_AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})
"""The Runtime API calls a SuperNode with a SuperExec secret checks (Flower 1.41)."""


def _is_tls_failure(exc: BaseException) -> bool:
    import ssl

    seen: BaseException | None = exc
    while seen is not None:
        # an EOF mid-handshake is the SuperNode going away, not another listener
        if isinstance(seen, ssl.SSLError) and not isinstance(seen, ssl.SSLEOFError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _status_code(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def task_heartbeat_fn(client: Any, cancelled: threading.Event) -> Any:
    """Flower's task heartbeat, without ending the process when the task is gone.

    Flower's own (``make_task_heartbeat_fn_http``) raises SIGINT when the SuperNode
    no longer knows the task: right for a one-task ``flwr-clientapp`` process, but
    it would stop the whole site daemon. Here the task is marked cancelled instead.
    """
    import httpx

    from ..flower_compat.runtime import SendTaskHeartbeatRequest

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (
                httpx.codes.SERVICE_UNAVAILABLE,
                httpx.codes.GATEWAY_TIMEOUT,
            ):
                return False
            cancelled.set()
            return True
        if not response.success:
            cancelled.set()
        return True

    return beat


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Flower's ``pull_task_input``, polling the message's objects every few ms.

    The SuperNode announces a message before it has fetched the message's arrays
    from the coordinator; Flower's default retry for an object that is not there yet
    waits 1 s, then 2 s, then 4 s, which cost up to 7 s per message on loopback.
    """
    from flwr.app import Message

    from ..flower_compat.pacing import OBJECT_POLL_CAP_S, OBJECT_POLL_S
    from ..flower_compat.runtime import (
        Node,
        PullAppMessagesRequest,
        PullTaskInputRequest,
        TaskIdentity,
        context_from_proto,
        fab_from_proto,
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
        pull_and_inflate_object_from_tree,
        run_from_proto,
    )

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode announced a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=OBJECT_POLL_S,
        backoff_cap=OBJECT_POLL_CAP_S,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


def _safe_bytes(count: Any, message: Any) -> int:
    try:
        return int(count(message.content))
    except Exception:  # noqa: BLE001 - an error message has no content
        return 0


def _round_and_run(message: Any) -> tuple[int | None, str]:
    from ..common import wire
    from ..ops.audit_fields import coordinator_label

    try:
        for record in message.content.config_records.values():
            value = wire.round_number(record.get(wire.SERVER_ROUND))
            if value is not None:
                return value, coordinator_label(record.get(wire.RUN_ID, ""))
    except Exception:  # noqa: BLE001 - only for the records; never fails a task
        pass
    return None, ""


def _tensor_names(reply: Any) -> list[str]:
    from .egress_log import reply_tensor_names

    try:
        return reply_tensor_names(reply.content)
    except Exception:  # noqa: BLE001 - an error reply has no content
        return []


def _numeric_metrics(reply: Any) -> dict[str, float]:
    # Message-API replies carry metrics in a MetricRecord; legacy (SecAgg+) ones in
    # the FitRes's ConfigRecord.
    metrics: dict[str, float] = {}
    content = reply.content
    for record in (*content.metric_records.values(), *content.config_records.values()):
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[key] = float(value)
    return metrics


def _end_task(
    client: Any, reply: Any, context: Any, sub_status: str, details: str
) -> None:
    """Push the reply (if any) and the task's end status to the SuperNode."""
    from ..flower_compat.runtime import push_message, push_task_output

    if reply is not None and context is not None:
        try:
            push_message(client, reply, context)
        except Exception as exc:  # noqa: BLE001 - the SuperNode went away
            log.error("could not push the reply: %s", exc)
    try:
        push_task_output(client, context, sub_status, details)
    except Exception as exc:  # noqa: BLE001 - the SuperNode dropped the task
        log.warning("could not report the task's end: %s", exc)
