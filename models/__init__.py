"""Models: teachers and students from spec strings (timm).

``spec`` (``NAME=MODEL,key=value`` parsing and validation), ``create`` (timm models, local
checkpoints, a fingerprint of the weights), ``data_config`` (the resolved preprocessing, typed),
``taps`` (where features come out), ``teacher``, ``student``, ``device``, ``convert_weights``
(checkpoints in other libraries' key layouts -> timm checkpoints).
"""
