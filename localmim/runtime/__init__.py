"""The runtime room, below ``data``, ``train`` and ``eval``: where a process runs and how it computes. The process
group and DDP (:mod:`.distributed`), precision and autocast (:mod:`.precision`), seeding (:mod:`.seed`) and the
checkpoint file format (:mod:`.checkpoint`). Pure torch; it imports nothing of localmim but ``utils``."""
