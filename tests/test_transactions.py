"""pyramid_tm and WebSockets: the handler runs inside the view for the whole
connection, so a transaction begun for the upgrade request would stay open
(with its database connection) until the client leaves. stargate tells
pyramid_tm to begin none for WebSocket requests; a handler opens a short
transaction per unit of work with ``request.tm``."""

import json

import pytest
import transaction
from pyramid.config import Configurator
from pyramid.response import Response
from pyramid_tm import is_tm_active

from stargate import WebSocketView
from stargate.config import NoTransactionForWebSockets
from stargate.testing.client import connect


class Committed:
    """A minimal data manager (the ``transaction`` package's interface) that
    records what each commit carried, like a database would."""

    def __init__(self, log, value):
        self.log = log
        self.value = value
        self.transaction_manager = transaction.manager

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        self.log.append(self.value)

    def tpc_abort(self, txn):
        pass

    def abort(self, txn):
        pass

    def sortKey(self):
        return f"committed-{id(self)}"


COMMITS = []


class TransactionView(WebSocketView):
    def handler(self, websocket):
        request = self.request
        websocket.send(json.dumps({"tm_active": is_tm_active(request)}))
        while (message := websocket.wait()) is not None:
            # one short transaction per message: the documented recipe
            with request.tm as txn:
                txn.join(Committed(COMMITS, message))
            websocket.send("committed " + message)


def plain(request):
    return Response(json.dumps({"tm_active": is_tm_active(request)}))


def make_app(**settings):
    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        config.include("stargate")
        config.add_route("ws", "/ws")
        config.add_view(TransactionView, route_name="ws", websocket=True)
        config.add_route("plain", "/plain")
        config.add_view(plain, route_name="plain")
        return config.make_wsgi_app()


def plain_get(app):
    from webtest import TestApp

    return json.loads(TestApp(app).get("/plain").text)


def test_a_websocket_connection_holds_no_transaction(stargate_server):
    server = stargate_server(make_app())
    with connect(server.ws_url("/ws")) as client:
        assert json.loads(client.receive()) == {"tm_active": False}


def test_plain_requests_still_get_their_transaction():
    assert plain_get(make_app()) == {"tm_active": True}


def test_a_handler_commits_one_short_transaction_per_message(stargate_server):
    COMMITS.clear()
    server = stargate_server(make_app())
    with connect(server.ws_url("/ws")) as client:
        client.receive()
        for word in ("one", "two"):
            client.send(word)
            assert client.receive() == f"committed {word}"
    assert COMMITS == ["one", "two"]


def refuse_plain(request):
    return request.path != "/plain"


@pytest.mark.parametrize("hook", [refuse_plain, "tests.test_transactions:refuse_plain"])
def test_the_applications_own_activate_hook_still_decides(hook):
    assert plain_get(make_app(**{"tm.activate_hook": hook})) == {"tm_active": False}


def test_including_twice_wraps_once():
    settings = {"tm.activate_hook": refuse_plain}
    with Configurator(settings=settings) as config:
        config.include("stargate")
        config.include("stargate")
    hook = config.registry.settings["tm.activate_hook"]
    assert isinstance(hook, NoTransactionForWebSockets)
    assert hook.wrapped is refuse_plain
