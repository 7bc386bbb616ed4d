import eventlet

eventlet.monkey_patch()  # before pytest imports anything that uses sockets
