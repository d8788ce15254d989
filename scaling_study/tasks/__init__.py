"""Downstream tasks: the registry of task folders (`registry`), one folder per task.

    from scaling_study.tasks.registry import discover
    registry = discover()                 # packaged tasks (+ extra folders)
    registry.tasks["bc5cdr_ner"].metric   # 'entity_f1'
    registry.suites["paper12"]            # the 12 tasks of Hong et al. (2023)
"""
