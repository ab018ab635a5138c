"""Holds an established TCP connection to a peer outside its tree, then says it is ready."""

import os
import socket
import sys
import time

conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
ready = os.path.join(os.environ["SNAPSHOT_CONTROL_DIR"], "ready-for-snapshot")
with open(ready, "w"):
    pass
time.sleep(600)
