"""What the test modules share: processes, ports, the test run's environment, job helpers.

- :mod:`.process`: :class:`~.process.ManagedProcess` (every subprocess a test starts) and ``wait_for``;
- :mod:`.ports`: ``free_port``;
- :mod:`.env`: the private Redis database, the environment every process gets, ``worker_env``;
- :mod:`.cluster`: the project's processes (``bin/worker``, ``bin/bridge``) and ``redis-server``;
- :mod:`.jobs`: job ids, tiny jobs, terminal callbacks.

Test modules import from here, never from each other; ``conftest.py`` holds the fixtures.
Importing this package does nothing; :mod:`.env` claims the database when first imported.
"""
