"""Text -> video search over a registered model: a resumable feature index built with Ray Data
batch inference (:mod:`.index`), and exhaustive or two-stage (coarse -> rerank) search (:mod:`.engine`).

The names below load their submodule on first use, so the CLI (which imports ``.cli``) stays cheap."""

from importlib import import_module

_EXPORTS = {"Searcher": "engine", "SearchHit": "engine", "topk_overlap": "engine", "VideoIndex": "index",
            "build_index": "index", "default_index_uri": "index", "load_index": "index"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
