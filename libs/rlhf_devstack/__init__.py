"""The development stack, used by no service: the dev Kafka broker, the local stack of every
service as processes on loopback ports, the demo, and tiny models built locally for tests.

Installed with the `dev` extra.
"""
