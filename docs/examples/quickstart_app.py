"""A chat in one file: a page at / and a WebSocket at /chat.

Run it with ``python quickstart_app.py`` and open http://127.0.0.1:6543/ in
two browser tabs.
"""

import eventlet

eventlet.monkey_patch()  # first: everything imported below must be green

from pyramid.config import Configurator  # noqa: E402
from pyramid.response import Response  # noqa: E402

from stargate import WebSocketAwareResource, WebSocketView  # noqa: E402


class ChatRoom(WebSocketAwareResource):
    """Everyone connected to /chat listens here."""

    channel = "chat"


ROOM = ChatRoom()


class ChatView(WebSocketView):
    """Joins the room, then broadcasts whatever the client sends."""

    def handler(self, websocket):
        room = self.request.context
        room.add_listener(websocket)
        while (message := websocket.wait()) is not None:
            room.send(message)


PAGE = """<!doctype html>
<meta charset="utf-8">
<title>stargate chat</title>
<form id="form"><input id="text" autofocus> <button>Send</button></form>
<ul id="log"></ul>
<script>
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/chat");
  const log = document.getElementById("log");
  ws.onmessage = (event) => {
    const item = document.createElement("li");
    item.textContent = event.data;
    log.append(item);
  };
  document.getElementById("form").onsubmit = (event) => {
    event.preventDefault();
    const text = document.getElementById("text");
    ws.send(text.value);
    text.value = "";
  };
</script>
"""


def page(request):
    return Response(PAGE, content_type="text/html", charset="utf-8")


def make_app(settings=None):
    with Configurator(settings=settings) as config:
        config.include("stargate")
        config.add_route("page", "/")
        config.add_view(page, route_name="page")
        config.add_route("chat", "/chat", factory=lambda request: ROOM)
        config.add_view(ChatView, route_name="chat", websocket=True)
        return config.make_wsgi_app()


if __name__ == "__main__":
    from stargate.factory import serve

    serve(make_app(), "127.0.0.1", 6543)
