"""captionbot's inference core: types, errors, the engine and the model tasks.

Importing ``core`` is cheap: torch and the model libraries load inside ``core.tasks`` only
when a task loads its model.
"""
