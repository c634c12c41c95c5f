"""Lock tokens (proxy/flow/context.py): unique per claim, in this process and in a forked one."""

from __future__ import annotations

import os

from proxy.flow.context import new_token


def test_tokens_are_distinct_version_4_uuids():
    """Ten thousand lock tokens are all distinct RFC 4122 version-4 UUIDs."""
    tokens = [new_token() for _ in range(10_000)]
    assert len(set(tokens)) == len(tokens)
    assert all(t.version == 4 and t.variant == "specified in RFC 4122" for t in tokens)


def test_a_forked_child_draws_its_own_tokens():
    """A worker forked from a process that already made tokens must not repeat them."""
    before = new_token()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next token and leave at once
        os.write(write, new_token().bytes)
        os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.waitpid(pid, 0)
    os.close(read)
    mine = new_token()
    assert child not in (before.bytes, mine.bytes)
    assert child[:8] != mine.bytes[:8]  # a different random half, not just a later count
