"""Model structure, no Lightning: one real forward pass recorded (``trace``), which units depend on which
(``dependency``, engine in ``walk`` / ``kinds``), attention with fewer heads (``attention``), physically removing
pruned units (``compaction``), saving and loading the result (``serialization``) and what it costs (``macs``)."""
