"""Route presets: a webhook or event sender's settings, merged between `defaults` and
the route's own fields (config/routes.py)."""

from __future__ import annotations

from typing import Any

# Webhook senders: the delivery id is the key; tenants do not apply (the sender signs, it
# does not authenticate with Authorization); retries change the timestamp and signature
# headers but not the body, so only the body counts. 96h (unless a preset says otherwise)
# covers every webhook sender's horizon with a day to spare: Stripe retries for 3 days,
# GitHub redelivers for 3 days, Standard Webhooks (Svix) retries for ~28h plus manual
# replays, Shopify for 4h (48h formerly).
PRESETS: dict[str, dict[str, Any]] = {
    "github": {"key": {"header": "X-GitHub-Delivery"}},
    "shopify": {"key": {"header": "X-Shopify-Webhook-Id"}},
    "standard-webhooks": {"key": {"header": "webhook-id"}},
    # The event id is already a printable, bounded, unique id: the key is the id itself,
    # so `idemproxy keys show` finds the evt_... an operator sees in Stripe's dashboard.
    # `pending_webhooks` counts the endpoints still waiting, so it can differ between
    # two deliveries of one event: it must not make a retry a 422.
    "stripe": {"key": {"body": ["/id"], "raw": True},
               "fingerprint": {"canonical_json": True, "ignore": ["/pending_webhooks"]}},
    # Event pushers, each with the window its sender retries for. CloudEvents (HTTP
    # binding): an event is its source + id, as ce- headers in binary mode or in the JSON
    # in structured mode (the same key either way); 7d is as long as a Pub/Sub
    # subscription keeps a message, which brokers built on it (Eventarc) inherit.
    "cloudevents": {"key": {"headers": ["ce-source", "ce-id"], "body": ["/source", "/id"]},
                    "ttl": "7d"},
    # SNS over HTTP/S: message ids are per topic, so the topic is part of the key; SNS's
    # HTTP/S retry policy is capped at 3600 s in total, so 24h leaves room for redrives.
    "sns": {"key": {"headers": ["x-amz-sns-topic-arn", "x-amz-sns-message-id"]},
            "ttl": "24h"},
    # Pub/Sub push: message ids are per topic, so the subscription counts too; Pub/Sub
    # redelivers until the subscription's retention ends (7 days at most). A dead-letter
    # policy adds `deliveryAttempt`, which grows on every redelivery: not fingerprinted.
    "pubsub-push": {"key": {"body": ["/subscription", "/message/messageId"]}, "ttl": "7d",
                    "fingerprint": {"canonical_json": True, "ignore": ["/deliveryAttempt"]}},
}
PRESET_COMMON: dict[str, Any] = {
    "tenant": "none", "require_key": True, "ttl": "96h",
    "fingerprint": {"query": False, "body": True, "headers": []},
}
