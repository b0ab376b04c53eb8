"""Development tools that live in the checkout, not in the wheel.

- :mod:`devtools.sink`: a local Supabase-compatible sink (storage and the job callback), for the demo and the tests;
- :mod:`devtools.demo`: ``bin/demo``, the whole cluster on tiny models, end to end;
- :mod:`devtools.schemas`: ``python -m devtools.schemas``, the JSON Schemas and TypeScript types from the models.
"""
