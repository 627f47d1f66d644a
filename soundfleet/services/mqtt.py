"""One way to make a paho-mqtt 2.x client for a broker URL (edge agent, ingest, demo).

paho is imported here at call time only, so `soundfleet.services` stays
importable without it.
"""

from __future__ import annotations

from typing import Any

from .urls import MqttEndpoint, parse_mqtt_url

RECONNECT_MIN_DELAY_S = 1
RECONNECT_MAX_DELAY_S = 30  # paho doubles the delay after each failed attempt up to this


def mqtt_client(broker_url: str, client_id: str, *, persistent: bool = False,
                manual_ack: bool = False) -> tuple[Any, MqttEndpoint]:
    """An MQTT 3.1.1 client (amqtt speaks nothing newer) with credentials, TLS and
    reconnect backoff taken from ``broker_url``; not yet connected. ``persistent``: a
    session the broker keeps across disconnects (``clean_session=False``); ``manual_ack``:
    QoS 1 messages are acknowledged by ``client.ack`` only (cloud/mqtt_session.py)."""
    import paho.mqtt.client as mqtt

    endpoint = parse_mqtt_url(broker_url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                         clean_session=not persistent, manual_ack=manual_ack)
    if endpoint.username:
        client.username_pw_set(endpoint.username, endpoint.password)
    if endpoint.tls:
        client.tls_set()
    client.reconnect_delay_set(min_delay=RECONNECT_MIN_DELAY_S, max_delay=RECONNECT_MAX_DELAY_S)
    return client, endpoint
