"""Building training data with the model itself (docs/data_construction.md): LongPO's
self-evolution records from long documents (``longpo``) and SoLoPO's short/long pairs from QA
with marked evidence (``solopo``), resumable and sharded (``runner``). Uses ``generation/`` and
``data/``; knows nothing of training."""
