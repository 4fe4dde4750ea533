"""tvr_platform: Ray Data, Ray Train + DeepSpeed, Ray Tune and MLflow wiring for tvr.

Lives in the source root ``platform/`` (never a package itself: a package named ``platform``
would shadow the standard library). Nothing here holds model math; that is ``tvr``.
"""
