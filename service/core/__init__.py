"""The daemon's pure core: no sockets, no threads.

Events and their decoding, learning a batch, the learner state and its
id window, forget rules, the snapshot format and store, restoring a state.

No sockets and no threads: everything here is a function of its arguments (plus files, for
snapshots), so crash-and-resume is an ordinary unit test. May import ``service.errors``,
``service.metrics``, ``learner`` and ``memory``.
"""
