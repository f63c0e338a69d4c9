#!/usr/bin/env python3
"""Unauthenticated load against a tern daemon, for tools/load.sh.

  flood.py tls N HOST PORT ADDRS      N TLS connections that complete the
                                      handshake and then send nothing, each
                                      reopened as soon as the daemon drops it
  flood.py frame N HOST PORT ADDRS    the same, each sending the first bytes
                                      of a frame (a stream that never gets
                                      as far as authenticating)
  flood.py quic RATE HOST PORT        RATE QUIC Initials a second, each with
                                      a fresh connection ID, from a random
                                      127.x.y.z address, never answering
                                      what the daemon sends back

ADDRS is how many loopback source addresses the TLS connections come from:
127.0.1.1 on for tls, 127.0.2.1 on for frame. Runs until SIGTERM, then
prints one line of counts.
The QUIC Initials carry a real TLS ClientHello (RFC 9001 initial
protection), so the daemon does all the work of a handshake for each one it
accepts: what spoofed Initials would cost it.
"""

import os
import random
import signal
import socket
import ssl
import struct
import sys
import threading
import time

stop = threading.Event()
counts = {"opened": 0, "dropped": 0, "refused": 0, "initials": 0}
lock = threading.Lock()


def count(key):
    with lock:
        counts[key] += 1


def hold(host, port, src, frame):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["tern/1"])
    while not stop.is_set():
        try:
            raw = socket.create_connection((host, port), timeout=5, source_address=(src, 0))
            s = ctx.wrap_socket(raw, server_hostname="tern")
        except OSError:
            count("refused")
            time.sleep(0.05)
            continue
        count("opened")
        try:
            if frame:
                s.sendall(b"\x00\x00")
            s.settimeout(1)
            while not stop.is_set():
                try:
                    if not s.recv(4096):
                        break
                except socket.timeout:
                    continue
        except OSError:
            pass
        count("dropped")
        s.close()


# QUIC v1 initial protection (RFC 9001, section 5).
SALT = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")


def hkdf_label(secret, label, length):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    full = b"tls13 " + label
    info = struct.pack(">H", length) + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def initial_keys(dcid):
    import hmac
    import hashlib

    initial = hmac.new(SALT, dcid, hashlib.sha256).digest()
    client = hkdf_label(initial, b"client in", 32)
    return hkdf_label(client, b"quic key", 16), hkdf_label(client, b"quic iv", 12), hkdf_label(client, b"quic hp", 16)


def ext(kind, data):
    return struct.pack(">HH", kind, len(data)) + data


def client_hello(scid):
    params = bytes([0x0F, len(scid)]) + scid  # initial_source_connection_id
    alpn = b"\x06tern/1"
    exts = b"".join(
        [
            ext(0x002B, b"\x02\x03\x04"),  # supported_versions: TLS 1.3
            ext(0x000A, b"\x00\x02\x00\x1d"),  # supported_groups: x25519
            ext(0x000D, b"\x00\x06\x08\x07\x04\x03\x08\x04"),  # signature_algorithms
            ext(0x0033, b"\x00\x24\x00\x1d\x00\x20" + os.urandom(32)),  # key_share
            ext(0x0010, struct.pack(">H", len(alpn)) + alpn),
            ext(0x0039, params),  # quic_transport_parameters
        ]
    )
    body = (
        b"\x03\x03"
        + os.urandom(32)
        + b"\x00"  # no legacy session id
        + b"\x00\x06\x13\x01\x13\x02\x13\x03"
        + b"\x01\x00"
        + struct.pack(">H", len(exts))
        + exts
    )
    return b"\x01" + struct.pack(">I", len(body))[1:] + body


def varint2(n):
    return struct.pack(">H", 0x4000 | n)


def initial(dcid, scid):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key, iv, hp = initial_keys(dcid)
    hello = client_hello(scid)
    crypto = b"\x06\x00" + varint2(len(hello)) + hello
    pn = b"\x00\x00"
    # Padded so that the datagram is 1,200 bytes, as a client's must be.
    header_len = 1 + 4 + 1 + len(dcid) + 1 + len(scid) + 1 + 2 + len(pn)
    payload = crypto + b"\x00" * (1200 - header_len - 16 - len(crypto))
    header = (
        bytes([0xC0 | (len(pn) - 1)])
        + b"\x00\x00\x00\x01"
        + bytes([len(dcid)])
        + dcid
        + bytes([len(scid)])
        + scid
        + b"\x00"
        + varint2(len(pn) + len(payload) + 16)
        + pn
    )
    nonce = bytes(a ^ b for a, b in zip(iv, b"\x00" * 10 + pn))
    sealed = AESGCM(key).encrypt(nonce, payload, header)
    sample = sealed[4 - len(pn) : 4 - len(pn) + 16]
    enc = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = enc.update(sample) + enc.finalize()
    first = bytes([header[0] ^ (mask[0] & 0x0F)])
    pn_at = len(header) - len(pn)
    masked_pn = bytes(a ^ b for a, b in zip(header[pn_at:], mask[1 : 1 + len(pn)]))
    return first + header[1:pn_at] + masked_pn + sealed


def initials(rate, host, port):
    gap = 1.0 / rate
    while not stop.is_set():
        src = "127.%d.%d.%d" % (random.randint(1, 254), random.randint(0, 255), random.randint(1, 254))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((src, 0))
            s.sendto(initial(os.urandom(8), os.urandom(8)), (host, port))
            count("initials")
        except OSError:
            count("refused")
        s.close()
        time.sleep(gap)


def main():
    mode = sys.argv[1]
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = []
    if mode in ("tls", "frame"):
        n, host, port, addrs = int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        for i in range(n):
            src = "127.0.%d.%d" % (1 if mode == "tls" else 2, 1 + i % addrs)
            threads.append(threading.Thread(target=hold, args=(host, port, src, mode == "frame"), daemon=True))
    elif mode == "quic":
        rate, host, port = float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
        threads.append(threading.Thread(target=initials, args=(rate, host, port), daemon=True))
    else:
        sys.exit(__doc__)
    for t in threads:
        t.start()
    while not stop.is_set():
        stop.wait(0.5)
    with lock:
        print(mode, " ".join("%s=%d" % kv for kv in counts.items()), flush=True)


if __name__ == "__main__":
    main()
