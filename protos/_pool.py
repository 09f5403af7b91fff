"""tlserve's own descriptor pool.

The Open Inference Protocol's messages are named ``inference.*`` in every
implementation (tritonclient and KServe ship their own copies). Registered in
protobuf's default pool, two copies in one process collide ("duplicate
symbol"), so a service could not import tlserve.client beside tritonclient.
``make proto`` rewrites the generated modules to register here instead.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
