"""Text -> video search over a registered model: a resumable feature index built with Ray Data
batch inference (:mod:`.index`), and exhaustive or two-stage (coarse -> rerank) search (:mod:`.engine`)."""

from tvr_platform.search.engine import Searcher, SearchHit, topk_overlap
from tvr_platform.search.index import VideoIndex, build_index, default_index_uri, load_index

__all__ = ["SearchHit", "Searcher", "VideoIndex", "build_index", "default_index_uri", "load_index",
           "topk_overlap"]
