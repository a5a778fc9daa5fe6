"""docs/protocol.md is enough to write a client: its Python example runs as printed (against a server
on a free port instead of the default one) and gets the rows the store holds; every op the server
knows is documented."""
from __future__ import annotations

import os
import re

import numpy as np

from paramserver.protocol import OPS
from paramserver.store import WeightStore
from test_paramserver_server import inthread

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "protocol.md")


def test_the_documented_example_runs() -> None:
    text = open(DOC, encoding="utf-8").read()
    code = re.search(r"## Example \(Python, pyzmq only\)\s+```python\n(.*?)```", text, re.S).group(1)
    assert 'tcp://127.0.0.1:5570' in code
    store = WeightStore(50, 4, seed=2)
    with inthread(store) as (_, addr):
        scope: dict = {}
        exec(code.replace("tcp://127.0.0.1:5570", addr), scope)      # noqa: S102 (our own document)
        scope["s"].close(linger=0)
    assert scope["header"]["ok"] is True and scope["header"]["v"] == 2
    np.testing.assert_array_equal(scope["rows"], store.pull([3, 17, 42]))


def test_every_op_is_documented() -> None:
    text = open(DOC, encoding="utf-8").read()
    for op in OPS:
        assert f"| `{op}` |" in text, op
