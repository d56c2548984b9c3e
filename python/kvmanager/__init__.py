"""kvmanager for Python: the client of the KV-cache service and the worker-side sparse decoder.

    import kvmanager
    shape = kvmanager.ModelShape(layers=6, q_heads=6, kv_heads=2, head_dim=64, dtype="fp16")
    with kvmanager.Client("127.0.0.1:7420", tenant="dev", data_plane="none") as c:
        c.create_sequence(1, shape, block_size=16)
        c.append(1, 0, token_ids, kv)            # kv: [layers][kv_heads][2][n][head_dim] fp16
        k = c.read_blocks(1, layer=0, kv_head=0, block_indices=[0])

Buffers are numpy arrays or CPU torch tensors, read and written in place (no copies; checked
against the shape before use). Importing the package loads neither numpy nor torch: numpy is
imported when a call has to allocate a result array. The vLLM connector is
``kvmanager.vllm.connector.KvmanagerConnector``.
"""

from ._errors import *  # noqa: F401,F403
from ._errors import Error, BY_CODE as _BY_CODE  # noqa: F401
from ._kvmanager import Client, ModelShape, SparseDecoder, PROTOCOL_VERSION  # noqa: F401

__version__ = "0.1.0"
__all__ = ["Client", "ModelShape", "SparseDecoder", "PROTOCOL_VERSION", "Error"] + [
    c.__name__ for c in _BY_CODE.values()]
