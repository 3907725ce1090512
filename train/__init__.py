"""Training: students from cached targets (or, ``--online``, from live teachers).

``config`` (``TrainConfig``: every option, validated, with its default), ``fit`` (build a run,
write its directory, the epoch loop), ``sources`` (where targets come from: a store, or live
teachers), ``loader`` (corpus shard and store shard streamed together), ``online`` (live
teachers on fresh views), ``model`` (student + per-teacher heads), ``trainer`` (the object that
owns model, optimizer, schedule, EMA, step policy and losses; ``step(batch)``), ``balance``
(MGDA, teacher dropping), ``rundir``, ``checkpoint``, ``metrics``, ``export``. Never imports
``extract`` or ``quantize``.
"""
