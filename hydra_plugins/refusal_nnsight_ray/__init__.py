"""`hydra/launcher=ray`: a Hydra launcher that runs each job of a multirun as one Ray task.

Hydra finds it by scanning the `hydra_plugins` namespace package; `ray_launcher` registers the
config and the Launcher without importing Ray, `_core` (imported only when a sweep is launched)
does the Ray work.
"""
