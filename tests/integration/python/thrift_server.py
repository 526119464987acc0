#!/usr/bin/python3
"""A Thrift server written with Debian's python3-thrift, for the scales integration tests.

Serves the Echo service (tools/echo.thrift) or the Derived test service
(tests/thrift/scales_test.thrift) with a thread per connection, framed or buffered, binary or
compact. Listens on 127.0.0.1 (port 0 = any free port) and prints exactly one line,
`listening 127.0.0.1:<port>`, once it accepts connections.

usage: thrift_server.py GEN_PY_DIR [--service echo|derived] [--port P]
                        [--transport framed|buffered] [--protocol binary|compact]
"""
import argparse
import sys
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("gen_py")
parser.add_argument("--service", choices=["echo", "derived"], default="echo")
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--transport", choices=["framed", "buffered"], default="framed")
parser.add_argument("--protocol", choices=["binary", "compact"], default="binary")
args = parser.parse_args()
sys.path.insert(0, args.gen_py)

from thrift.protocol import TBinaryProtocol, TCompactProtocol  # noqa: E402
from thrift.transport import TSocket, TTransport  # noqa: E402


class EchoHandler:
    def echo(self, message):
        return message

    def ping(self):
        pass

    def fail(self, message):
        from scales_echo.ttypes import EchoError
        raise EchoError(message=message)

    def sleep(self, millis):
        time.sleep(millis / 1000.0)
        return str(millis)


class DerivedHandler:
    def __init__(self):
        self.cond = threading.Condition()
        self.last = ""

    def base_echo(self, message):
        return message

    def add(self, a, b):
        return a + b

    def ping(self):
        pass

    def notify(self, message):
        with self.cond:
            self.last = message
            self.cond.notify_all()

    def last_notification(self, wait_ms):
        with self.cond:
            self.cond.wait_for(lambda: self.last != "", timeout=wait_ms / 1000.0)
            return self.last

    def roundtrip(self, blob):
        return blob

    def boom(self, code):
        from scales_thrifttest.ttypes import TestError
        raise TestError(message="boom %d" % code, code=code)

    def slow(self, millis):
        time.sleep(millis / 1000.0)
        return str(millis)


if args.service == "echo":
    from scales_echo import Echo
    processor = Echo.Processor(EchoHandler())
else:
    from scales_thrifttest import Derived
    processor = Derived.Processor(DerivedHandler())

tfactory = (TTransport.TFramedTransportFactory() if args.transport == "framed"
            else TTransport.TBufferedTransportFactory())
pfactory = (TBinaryProtocol.TBinaryProtocolFactory() if args.protocol == "binary"
            else TCompactProtocol.TCompactProtocolFactory())


def serve_connection(client):
    itrans = tfactory.getTransport(client)
    otrans = tfactory.getTransport(client)
    iprot = pfactory.getProtocol(itrans)
    oprot = pfactory.getProtocol(otrans)
    try:
        while True:
            processor.process(iprot, oprot)
    except TTransport.TTransportException:
        pass
    except Exception as e:  # noqa: BLE001 - a test server reports and drops the connection
        print("thrift_server.py: %r" % (e,), file=sys.stderr)
    itrans.close()
    otrans.close()


server = TSocket.TServerSocket(host="127.0.0.1", port=args.port)
server.listen()
port = server.handle.getsockname()[1]
print("listening 127.0.0.1:%d" % port, flush=True)
while True:
    client = server.accept()
    if client is None:
        continue
    threading.Thread(target=serve_connection, args=(client,), daemon=True).start()
