"""Code that site agents and the aggregator agree on: wire schema, codec, crypto, layout.

Nothing here talks to the network; modules only touch files they are handed.
"""
