"""Flower 1.41's Fleet API exchange of one message each way, with every HTTP byte counted.

Both ends are Flower's own code, in one process: the SuperLink is `flwr.superlink.main.
create_app()` (the FastAPI app `flower-superlink` serves, with its in-memory LinkState and
ObjectStore, node-authentication middleware and protobuf translation), reached through
starlette's in-process transport; the site is `FleetHttpClient` with the SuperNode's own
interceptors (version header, ECDSA request signature) and it repeats the SuperNode's steps
(`start_client_internal`): pull the message, pull each object of its tree that the node's
object store lacks, confirm; push the reply, then push each object the SuperLink asks for.

What is counted is what HTTP/1.1 puts on the connection: request line, headers and body each
way. Only two things are not Flower's: the server-side push of the instruction (done with
LinkState calls as the runtime API's handler does; it never crosses the site's link) and the
two headers uvicorn adds to every response (`date`, `server`), which the in-process transport
lacks and are added here. TLS adds ~22 bytes per 16 KiB record on top (not counted).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
from flwr.app import Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.fleet_pb2 import (  # pylint: disable=E0611
    ActivateNodeRequest,
    PullMessagesRequest,
    PushMessagesRequest,
    RegisterNodeFleetRequest,
)
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest  # pylint: disable=E0611
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    iterate_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_pull_object_fn_protobuf,
    make_push_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    pull_objects,
    push_object_contents_from_iterable,
)
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.main import create_app
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
from starlette.testclient import TestClient

# What uvicorn adds to every response (`date` is always 29 characters).
UVICORN_HEADERS = "date: Sun, 22 Nov 2026 00:00:00 GMT\r\nserver: uvicorn\r\n"
SERVER_ADDRESS = "https://fl.example.org"


@dataclass(frozen=True)
class Exchange:
    """One HTTP request and its response, in bytes on the connection."""

    path: str
    request_head: int
    request_body: int
    response_head: int
    response_body: int

    @property
    def sent(self) -> int:  # by the site
        return self.request_head + self.request_body

    @property
    def received(self) -> int:  # by the site
        return self.response_head + self.response_body


@dataclass
class Tally:
    exchanges: list[Exchange] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(e.sent for e in self.exchanges)

    @property
    def received(self) -> int:
        return sum(e.received for e in self.exchanges)

    @property
    def protobuf_sent(self) -> int:
        return sum(e.request_body for e in self.exchanges)

    @property
    def protobuf_received(self) -> int:
        return sum(e.response_body for e in self.exchanges)

    @property
    def requests(self) -> int:
        return len(self.exchanges)


class CountingTransport(httpx.BaseTransport):
    """Counts each request and response as HTTP/1.1 writes them, then passes it on."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.tally = Tally()
        self._lock = threading.Lock()  # the SuperNode pulls objects from several threads

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        head = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n" + _headers(request.headers)
        response = self.inner.handle_request(request)
        content = response.read()
        status = f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n"
        response_head = status + _headers(response.headers, extra=UVICORN_HEADERS)
        with self._lock:
            self.tally.exchanges.append(Exchange(request.url.path, len(head.encode()), len(body),
                                                 len(response_head.encode()), len(content)))
        return httpx.Response(response.status_code, headers=response.headers, content=content,
                              request=request)

    def take(self) -> Tally:
        with self._lock:
            tally, self.tally = self.tally, Tally()
        return tally


def _headers(headers: httpx.Headers, extra: str = "") -> str:
    return "".join(f"{k}: {v}\r\n" for k, v in headers.multi_items()) + extra + "\r\n"


class FleetLink:
    """A SuperLink with one running run, and one site (SuperNode) registered and active."""

    def __init__(self) -> None:
        app = create_app()
        self.state = app.state.linkstate_factory.state()
        self.run_id = self.state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None,
                                            "serverapp")
        task_id = self.state.run_ids[self.run_id].run.primary_task_id
        self.state.claim_task(task_id)
        self.state.activate_task(task_id)  # the run is now RUNNING
        # Messages take their run and source node from the process's task identity.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (
            self.run_id, SUPERLINK_NODE_ID, task_id)

        private_key, public_key = generate_key_pairs()
        self.transport = CountingTransport(TestClient(app)._transport)
        self.client = FleetHttpClient(SERVER_ADDRESS, interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperNode"),
            NodeAuthHttpInterceptor(private_key, public_key)])
        self.client._client = httpx.Client(transport=self.transport, timeout=60)
        key = public_key_to_bytes(public_key)
        self.client.RegisterNode(RegisterNodeFleetRequest(public_key=key))
        node_id = self.client.ActivateNode(ActivateNodeRequest(
            public_key=key, heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL)).node_id
        self.node = Node(node_id=node_id)
        self.node_store = InMemoryObjectStore()
        self.transport.take()  # joining is once per site, not per round

    # ---- the server's side (the ServerApp pushing through the runtime API) ---------------
    def server_sends(self, content: RecordDict, message_type: str, group_id: str,
                     ttl: float = 900.0) -> str:
        """Store an instruction for the site as the runtime API does; return its message id."""
        message = Message(content, dst_node_id=self.node.node_id, message_type=message_type,
                          ttl=ttl, group_id=group_id)
        with no_object_id_recompute():
            message.metadata.__dict__["_message_id"] = message.object_id
            session = self.state.start_session(self.run_id)
            bare = message_from_proto(message_to_proto(remove_content_from_message(message)))
            _, missing = self.state.store_message_and_object_tree(
                bare, get_object_tree(message), session)
            for object_id, obj in get_all_nested_objects(message).items():
                if object_id in missing:
                    self.state.store_object(self.run_id, session, object_id, obj.deflate())
        return message.metadata.message_id

    def server_receives(self, instruction_id: str) -> Message:
        """The reply to an instruction as the ServerApp would pull it (not counted: it does not
        cross the site's link)."""
        (reply,) = self.state.get_message_res({instruction_id}, self.run_id)
        if reply.has_error():
            raise RuntimeError(f"no reply to {instruction_id}: {reply.error.reason}")
        tree = self.state.object_store.get_object_tree(reply.metadata.message_id)
        contents = {t.object_id: self.state.get_object(self.run_id, t.object_id)
                    for t in iterate_object_tree(tree)}
        message = inflate_object_from_contents(reply.metadata.message_id, contents)
        assert isinstance(message, Message)
        message.metadata.__dict__["_message_id"] = reply.metadata.message_id  # as HttpGrid does
        # HttpGrid confirms receipt, which drops the reply's objects from the SuperLink's store.
        self.state.object_store.delete(reply.metadata.message_id)
        return message

    # ---- the site's side (the SuperNode's loop) ------------------------------------------
    def site_receives(self) -> Message:
        response = self.client.PullMessages(PullMessagesRequest(node=self.node))
        bare = message_from_proto(response.messages_list[0])
        tree = response.message_object_trees[0]
        to_pull = self.node_store.preregister(self.run_id, tree)
        contents = pull_objects(to_pull, pull_object_fn=make_pull_object_fn_protobuf(
            self.client.PullObject, self.node, self.run_id))
        for object_id, content in contents.items():
            self.node_store.put(object_id, content)
        self.client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(
            node=self.node, run_id=self.run_id, message_object_id=bare.metadata.message_id))
        all_contents = {t.object_id: self.node_store.get(t.object_id) for t in iterate_object_tree(tree)}
        message = inflate_object_from_contents(bare.metadata.message_id, all_contents)
        assert isinstance(message, Message)
        # The deflated message lacks its own id (its object id), as run_clientapp restores it.
        message.metadata.__dict__["_message_id"] = bare.metadata.message_id
        self.node_store.delete(bare.metadata.message_id)
        return message

    def site_replies(self, reply: Message) -> None:
        with no_object_id_recompute():
            reply.metadata.__dict__["_message_id"] = reply.object_id
            objects = get_all_nested_objects(reply)
            tree = get_object_tree(reply)
            response = self.client.PushMessages(PushMessagesRequest(
                node=self.node, messages_list=[message_to_proto(remove_content_from_message(reply))],
                message_object_trees=[tree], clientapp_runtime_list=[1.0]))
            wanted = set(response.objects_to_push)

            def contents() -> Iterator[tuple[str, bytes]]:
                for node in iterate_object_tree(tree):
                    if node.object_id in wanted:
                        wanted.discard(node.object_id)
                        yield node.object_id, objects[node.object_id].deflate()

            push_object_contents_from_iterable(contents(), make_push_object_fn_protobuf(
                self.client.PushObject, self.node, self.run_id, response.session_id))

    def site_idles(self) -> tuple[Tally, Tally]:
        """One empty pull (the SuperNode pulls every 3 s when idle) and one heartbeat."""
        self.client.PullMessages(PullMessagesRequest(node=self.node))
        pull = self.transport.take()
        self.client.SendNodeHeartbeat(SendNodeHeartbeatRequest(
            node=self.node, heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL))
        return pull, self.transport.take()

    def traffic(self) -> tuple[int, int]:
        """Flower's own traffic counter for the run: (bytes sent, bytes received) by the link."""
        run = self.state.run_ids[self.run_id].run
        return run.bytes_sent, run.bytes_recv


def arrays_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
