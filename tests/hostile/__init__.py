"""Hostile input: a corpus of bad images, misbehaving hosts, forbidden URLs and broken requests,
each sent through the real API and a real worker, each ending in a clear error."""
