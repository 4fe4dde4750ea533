"""``tvr bench methods``: every method trained with the same budget and seeds on the same synthetic
set, summarised as a Markdown table (see :mod:`.methods`)."""
