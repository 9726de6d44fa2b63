"""The kdviewer distillation engine: fine-tune a teacher, distil a student, evaluate, export a bundle.

No Qt here. The training panel drives this package through ``python -m training run CONFIG --events -``
and reads the JSON-lines event stream documented in `training.events`.
"""
