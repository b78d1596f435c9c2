"""Interop checks with the Python paho-mqtt client (1.6) against a broker.

Usage: python3 paho_check.py HOST PORT {3|5}
Prints "OK <check>" per passed check; any failure raises and exits non-zero.
Only talks to HOST:PORT (the test passes 127.0.0.1).
"""
import queue
import socket
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

HOST, PORT, VER = sys.argv[1], int(sys.argv[2]), sys.argv[3]
V5 = VER == "5"
PROTO = mqtt.MQTTv5 if V5 else mqtt.MQTTv311
TAG = "v5" if V5 else "v3"
clients = []


def client(cid, clean=True, expiry=None, will=None):
    cid = "%s-%s" % (TAG, cid)
    if V5:
        c = mqtt.Client(client_id=cid, protocol=PROTO)
    else:
        c = mqtt.Client(client_id=cid, protocol=PROTO, clean_session=clean)
    c.q = queue.Queue()
    c.on_message = lambda cl, ud, m: cl.q.put(m)
    connected = threading.Event()
    c.res = {}

    def on_connect(cl, ud, flags, rc, props=None):
        cl.res["flags"] = flags
        cl.res["rc"] = rc
        connected.set()

    c.on_connect = on_connect
    if will:
        c.will_set(*will)
    if V5:
        p = Properties(PacketTypes.CONNECT)
        if expiry is not None:
            p.SessionExpiryInterval = expiry
        c.connect(HOST, PORT, 30, clean_start=clean, properties=p)
    else:
        c.connect(HOST, PORT, 30)
    c.loop_start()
    assert connected.wait(5), "no CONNACK for " + cid
    assert c.res["rc"] == 0, c.res
    clients.append(c)
    return c


def sub(c, topic, qos=1, props=None, opts=None):
    ev = threading.Event()
    c.on_subscribe = lambda *a: ev.set()
    if V5:
        c.subscribe(topic, options=opts or SubscribeOptions(qos=qos), properties=props)
    else:
        c.subscribe(topic, qos)
    assert ev.wait(5), "no SUBACK for " + topic


def pub(c, topic, payload, qos=1, retain=False, props=None):
    info = c.publish(topic, payload, qos, retain, properties=props) if V5 else c.publish(topic, payload, qos, retain)
    info.wait_for_publish(5)
    assert info.is_published(), "publish to %s not acknowledged" % topic


def get(c, t=5):
    try:
        return c.q.get(timeout=t)
    except queue.Empty:
        raise AssertionError("no message within %ss" % t)


def none(c, t=0.3):
    try:
        m = c.q.get(timeout=t)
    except queue.Empty:
        return
    raise AssertionError("unexpected message on %s" % m.topic)


def stop(c):
    c.disconnect()
    c.loop_stop()


def check_qos():
    s = client("qs")
    sub(s, "p/#", 2)
    p = client("qp")
    for q in (0, 1, 2):
        pub(p, "p/%d" % q, b"m%d" % q, q)
    got = sorted((m.topic, m.payload, m.qos) for m in (get(s), get(s), get(s)))
    assert got == [("p/0", b"m0", 0), ("p/1", b"m1", 1), ("p/2", b"m2", 2)], got
    none(s)
    stop(s)
    stop(p)
    print("OK qos")


def check_retained():
    p = client("rp")
    pub(p, "pr/a", b"ret", 1, retain=True)
    s = client("rs")
    sub(s, "pr/#", 1)
    m = get(s)
    assert (m.topic, m.payload, m.retain) == ("pr/a", b"ret", True), (m.topic, m.payload, m.retain)
    pub(p, "pr/a", b"", 1, retain=True)
    s2 = client("rs2")
    sub(s2, "pr/#", 1)
    none(s2)
    for c in (p, s, s2):
        stop(c)
    print("OK retained")


def check_will():
    w = client("ww")
    sub(w, "pw/#", 1)
    d = client("wd", will=("pw/dead", b"bye", 1, False))
    d.loop_stop()
    d.socket().shutdown(socket.SHUT_RDWR)
    d.socket().close()
    m = get(w)
    assert (m.topic, m.payload) == ("pw/dead", b"bye"), (m.topic, m.payload)
    stop(w)
    print("OK will")


def check_persistent():
    s = client("ps", clean=False, expiry=300) if V5 else client("ps", clean=False)
    sub(s, "ps/#", 1)
    stop(s)
    time.sleep(0.2)
    p = client("pp")
    for i in range(3):
        pub(p, "ps/t", b"q%d" % i, 1)
    s = client("ps", clean=False, expiry=300) if V5 else client("ps", clean=False)
    flags = s.res["flags"]
    present = flags.get("session present") if isinstance(flags, dict) else flags
    assert present, "session present flag not set: %r" % (flags,)
    got = [get(s).payload for _ in range(3)]
    assert got == [b"q0", b"q1", b"q2"], got
    stop(s)
    # Remove the session again.
    s = client("ps", clean=True, expiry=0) if V5 else client("ps", clean=True)
    stop(s)
    stop(p)
    print("OK persistent")


def check_v5_properties():
    s = client("props-s")
    sp = Properties(PacketTypes.SUBSCRIBE)
    sp.SubscriptionIdentifier = 7
    sub(s, "pp/#", 1, props=sp)
    p = client("props-p")
    pp = Properties(PacketTypes.PUBLISH)
    pp.UserProperty = [("k", "v")]
    pp.ContentType = "text/plain"
    pp.ResponseTopic = "resp/t"
    pp.CorrelationData = b"cid"
    pp.MessageExpiryInterval = 60
    pp.PayloadFormatIndicator = 1
    pub(p, "pp/x", b"hello", 1, props=pp)
    m = get(s)
    mp = m.properties
    assert mp.UserProperty == [("k", "v")], mp.UserProperty
    assert mp.ContentType == "text/plain"
    assert mp.ResponseTopic == "resp/t"
    assert mp.CorrelationData == b"cid"
    assert 0 < mp.MessageExpiryInterval <= 60
    assert mp.PayloadFormatIndicator == 1
    assert mp.SubscriptionIdentifier == [7], mp.SubscriptionIdentifier
    stop(s)
    stop(p)
    print("OK v5-properties")


def check_v5_shared_and_no_local():
    a = client("sh-a")
    b = client("sh-b")
    sub(a, "$share/g/sh/t", 1)
    sub(b, "$share/g/sh/t", 1)
    p = client("sh-p")
    for i in range(20):
        pub(p, "sh/t", b"%d" % i, 1)
    time.sleep(0.5)
    na, nb = a.q.qsize(), b.q.qsize()
    assert na + nb == 20 and na > 0 and nb > 0, (na, nb)
    n = client("nl")
    sub(n, "nl/t", opts=SubscribeOptions(qos=1, noLocal=True))
    pub(n, "nl/t", b"own", 1)
    none(n)
    pub(p, "nl/t", b"other", 1)
    assert get(n).payload == b"other"
    for c in (a, b, p, n):
        stop(c)
    print("OK v5-shared-no-local")


check_qos()
check_retained()
check_will()
check_persistent()
if V5:
    check_v5_properties()
    check_v5_shared_and_no_local()
print("ALL OK")
