"""Test-only ClientApp: silo_node.app.client_app, except that the silo named ``evil`` poisons its train
replies. Round 1: its update (what it sends minus what it received) scaled x100. Later rounds: an
honest update that claims 10^9 training examples. tests/test_poisoned_silo_e2e.py copies this file
into a throw-away Flower App directory; the real app never contains it."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from silo_node.app import client_app as real
from silotune import protocol as p
from silotune.adapters import from_array_record, to_array_record
from silotune.wire_codec import decode, decode_uplink, encode_uplink, encoding_in, payload_shapes

EVIL = "evil"
SCALE = 100.0

app = ClientApp()


@app.query()
def handshake(msg: Message, context: Context) -> Message:
    return real.handshake(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = real.train(msg, context)
    if str(context.node_config.get(p.SILO, "")) != EVIL and str(context.node_config.get("name", "")) != EVIL:
        return reply
    if int(msg.content[p.REC_CONFIG][p.SERVER_ROUND]) == 1:
        # In the run's wire format (fp32 adapters, packed by default), as the honest code sends.
        wire = from_array_record(msg.content[p.REC_ARRAYS])
        enc = encoding_in(wire)
        sent = decode(wire, enc, payload_shapes(wire))
        got = decode_uplink(from_array_record(reply.content[p.REC_ARRAYS]), sent, enc)
        poisoned = {k: sent[k] + SCALE * (got[k] - sent[k]) for k in got}
        reply.content[p.REC_ARRAYS] = to_array_record(encode_uplink(poisoned, sent, enc))
    else:
        reply.content[p.REC_METRICS][p.NUM_EXAMPLES] = 10**9
    return reply
