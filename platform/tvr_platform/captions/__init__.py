"""ExCae caption self-improvement (CSI) and corpus captioning jobs.

- :mod:`.config`          the ``captions`` section of a job spec
- :mod:`.openai_backend`  OpenAI-compatible captioner / prompt engineer (retries, budget, hygiene)
- :mod:`.csi`             ``run_csi(job)``: the CSI loop with MLflow logging
- :mod:`.corpus`          ``generate_corpus_captions(job)`` (Ray Data) and ``load_generated_captions``
- :mod:`.cli`             ``add_subcommands(subparsers)``: ``tvr captions improve | generate``

Submodules are imported on use, so importing the package (the config loader does) stays cheap.
"""
