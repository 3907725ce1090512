"""Evaluation: is the student, is the store any good?

``probes`` (kNN and the linear probe of a store's cached features, a run's student or any timm
model, with the exact protocol), ``knn`` and ``linear`` (the probes themselves), ``store_features``
and ``model_features`` (what they read), ``store_report`` (``eval store``: bytes and what
quantization kept), ``head_fidelity`` (``eval fidelity``: the student's heads against the
targets), ``report`` (``kdcache report``). Timing the pipeline is ``bench``'s job; nothing here
imports ``extract``.
"""
